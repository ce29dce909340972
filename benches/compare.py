"""Compare rnnkit with PyTorch and ONNX Runtime on CPU: ``python benches/compare.py --help``.

The harness itself is ``rnnkit.bench`` (also ``python -m rnnkit bench``), so that an installed
rnnkit can run it too.
"""

import sys

from rnnkit.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
