"""allreduce: the centralized reference (what DDP does). The upper bound every decentralized
method is compared with."""

from p2p.algorithms.local import Local


class AllReduce(Local):
    """g ← (1/n) Σ_i g_i (all-reduce every step, whatever K), then the torch optimizer steps.
    A blocking collective every step: `sync` mode only (no messages for a transport to delay).
    The rule holds no process group: the optimizer has its transport average g before `update`.

    The models stay identical because they start identical and see the same averaged gradient.
    """

    averages_gradients = True
