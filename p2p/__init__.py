"""p2p: decentralized (peer-to-peer) deep learning with real torch.distributed neighbour exchange."""
