"""One training process for tests/distributed, launched by torchrun: train() on replayed rollouts.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.distributed.worker REPLAY KEY=VALUE...
"""

import sys

import sapo.train
from sapo import distributed
from sapo.config import build_config, parse_overrides
from tests.distributed.replay import ReplayEngine


def main(argv: list[str]) -> None:
    replay, overrides = argv[0], parse_overrides(argv[1:])
    sapo.train.make_engine = lambda kind, model: ReplayEngine(replay)
    sapo.train.train(build_config(overrides=overrides), overrides)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
