"""Start one node of a decentralized training run.

    torchrun --standalone --nproc_per_node 4 train.py --config configs/quickstart.toml [--section.field value ...]

Every config field can be overridden as --section.field value; --help lists them with their defaults.
"""

import time

STARTED = time.perf_counter()  # before the imports, whose seconds the start-up log line counts

import errno  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

PARENT = os.getppid()  # torchrun's agent, before it has seconds to die unnoticed (checkpoint.follow_agent)

import torch  # noqa: E402

from p2p.checkpoint import follow_agent  # noqa: E402
from p2p.comm import PeerFailure  # noqa: E402
from p2p.config import Config, ConfigError, load_config, one_line, to_toml  # noqa: E402
from p2p.loop import NonFiniteLoss, Stopped  # noqa: E402
from p2p.trainer import run  # noqa: E402


def main(argv: list[str]) -> int:
    follow_agent(PARENT)  # under torchrun: stop when the agent dies, however it dies
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip(), "\nThe fields and their defaults (docs/configuration.md):\n", sep="\n")
        print(to_toml(Config()))
        return 0
    try:
        cfg = load_config(argv)
        if cfg.sim.nodes:
            from p2p import sim  # torch.func: only simulated runs need it

            sim.run(cfg)
        else:
            run(cfg, STARTED)
    except ConfigError as e:  # a user mistake: nothing was started or written
        sys.stderr.write(f"error: {e}\n")  # one write: ranks sharing a log file do not run lines together
        return 2
    except (NonFiniteLoss, PeerFailure) as e:  # the run failed; its last checkpoint is kept
        sys.stderr.write(f"error: {e}\n")  # one write: ranks sharing a log file do not run lines together
        return 1
    except torch.OutOfMemoryError as e:  # e.g. too many simulated nodes for one GPU; the last checkpoint is kept
        sys.stderr.write(f"error: out of GPU memory ({one_line(e)}): lower --data.batch_size, --sim.nodes or the "
                         f"model\n")
        return 1
    except OSError as e:  # a full disk: the checkpoints written before are kept (a half-written one is not)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        sys.stderr.write(f"error: cannot write to {e.filename or cfg.out_dir} ({e.strerror}): free some space or pick "
                         f"another --run.dir\n")
        return 1
    except Stopped as e:  # SIGTERM or SIGINT: every node checkpointed at one step (docs/faults.md)
        if os.environ.get("RANK", "0") == "0":  # one line for the network
            sys.stderr.write(f"{e}\n")
        return e.code
    except KeyboardInterrupt:  # Ctrl-C (a torchrun job's workers get SIGTERM from their agent instead)
        sys.stderr.write("error: interrupted (--run.resume continues the run from its newest checkpoint, if it has "
                         "one)\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
