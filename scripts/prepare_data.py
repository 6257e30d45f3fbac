"""Build the default corpus: data/stdlib/{train,eval}.jsonl and data/passkey/passkey.jsonl,
and with --retrieval_examples the long-context recipe's data under data/longctx.

    python scripts/prepare_data.py [--out data] [--limit N] [--force]

Idempotent: a second run with unchanged inputs returns at once. See data/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringformer.data import prepare
from ringformer.launch.flags import ArgumentParser, run_main


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    prepare.add_options(parser)
    args = parser.parse_args()
    prepare.check_options(args)
    for line in prepare.build(args):
        print(line)
    return 0


if __name__ == "__main__":
    run_main(main)
