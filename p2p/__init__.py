"""p2p: decentralized (peer-to-peer) deep learning on torch.distributed, as a library in your own loop.

    import p2p
    net = p2p.init(topology="topologies/ring8.json")          # under torchrun: one process per node
    model = MyNet().to(net.device)
    opt = p2p.DecentralizedOptimizer(model.parameters(), net, algorithm="pdmm_isvr", lr=0.1, momentum=0.9)
    for x, y in loader:                                      # your loop, loss and data, unchanged
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    opt.finish()                                             # complete the exchanges in flight
    avg = p2p.average_model(model, net)                      # the network-averaged model (a collective)

docs/library.md is the guide. The public API is what `__all__` lists; every other module may change.
`train.py` (p2p/trainer.py) and the simulator train through the same optimizer.
"""

from p2p.network import Network, init
from p2p.optimizer import DecentralizedOptimizer, average_model, consensus_distance

__all__ = ["init", "Network", "DecentralizedOptimizer", "average_model", "consensus_distance"]
