"""Every INT4 GEMM candidate at 32 and 64 rows on 7B shapes, timed two ways: back to back from a CUDA graph
over enough weight copies to exceed the L2 (as tools/gpu_bench.py times GEMMs) and with ``do_bench`` on
single launches (how the tuner timed before it used CUDA graphs). GPU only::

    python3 tools/gpu_int4_tuner_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from sqdeploy.kernels import triton_gemm as tg  # noqa: E402
from sqdeploy.testing.measure import copies_for, graph_ms, l2_bytes  # noqa: E402
from sqdeploy.testing.random_weights import VARIANTS, random_linear  # noqa: E402


def main() -> int:
    for n, k in ((12288, 4096), (4096, 4096), (22016, 4096)):
        probe = random_linear(n, k, VARIANTS["w4a16"], "cuda", seed=0)
        copies = copies_for(probe.weight_bytes(), l2_bytes())
        mods = [probe] + [random_linear(n, k, VARIANTS["w4a16"], "cuda", seed=j) for j in range(1, copies)]
        for m in (32, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            for c in tg.int4_gemm_candidates(m, k, 128, True, dequant=False):
                tg._INT4.forced = c
                try:
                    g = graph_ms([lambda mod=mod: mod(x) for mod in mods], reps=20)
                    d = do_bench(lambda: mods[0](x), warmup=5, rep=20, return_mode="median")
                    print(f"{n}x{k} M={m} {c.get('KIND', 'tc'):7s} MATH={c.get('MATH', '-')} {c['BLOCK_M']}x{c['BLOCK_N']} "
                          f"kper={c['K_PER']} w{c['num_warps']}s{c['num_stages']}: graph {g * 1e3:6.1f} us  "
                          f"tuner(do_bench) {d * 1e3:6.1f} us", flush=True)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print("fail", c, repr(e)[:200])
                finally:
                    tg._INT4.forced = None
        del mods, probe
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
