"""Start one node of a decentralized training run.

    torchrun --standalone --nproc_per_node 4 train.py --config configs/quickstart.toml [--section.field value ...]
"""

import sys

from p2p.comm import PeerFailure
from p2p.config import ConfigError, load_config
from p2p.trainer import NonFiniteLoss, run


def main(argv: list[str]) -> int:
    try:
        run(load_config(argv))
    except ConfigError as e:  # a user mistake: nothing was started or written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, PeerFailure) as e:  # the run failed; its last checkpoint is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
