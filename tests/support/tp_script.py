"""The tiny-model logits check as a launched script (tests/test_launchers.py, test_gpu.py,
test_multi_gpu.py): each rank runs the runtime's teacher-forced prefill + decode and rank 0
saves the per-sequence logits to OUT_FILE; the test compares them with transformers.

    torchrun --nproc-per-node=2 tests/support/tp_script.py MODEL_DIR OUT_FILE float32 [--device cuda] [--backend nccl]

MODEL_DIR is a HF directory or a run-config YAML. mpirun and the deepspeed launcher start it the
same way; the rank comes from the launcher's environment. Prints {"ok": true} when done.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run by path, Python puts only tests/support/ on sys.path: add tests/ (for `support`) and the
# repository root (this checkout's polar_dist and kernels, ahead of any installed copy).
_TESTS = Path(__file__).resolve().parents[1]
for _path in (_TESTS, _TESTS.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from support.tiny_models import rank_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("out_file")
    parser.add_argument("dtype")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # passed by deepspeed; unused
    args = parser.parse_args()
    torch.set_num_threads(1)  # the ranks share the machine's cores
    rank_main(-1, -1, args.model_dir, args.out_file, args.dtype, args.device, args.backend)
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    main()
