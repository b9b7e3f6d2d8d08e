import importlib
import os
import subprocess
import sys

import pytest
import torch

# Triton kernels run on CPU through Triton's interpreter; it is chosen when a kernel is defined,
# so this must happen before anything imports kernels/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

import kernels  # noqa: E402
import model as M  # noqa: E402


def bench(name):
    """A bench/ script as a module. bench/ goes after the project on sys.path: put first, its
    train.py would shadow the project's for every later `import train` in the session."""
    path = os.path.join(ROOT, "bench")
    if path not in sys.path:
        sys.path.append(path)
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def default_kernels():
    """A test may select other kernels (kernels.select, or train.main's --kernels): the next one starts afresh."""
    yield
    kernels.select("triton")


def assert_close(actual, expected, dtype=torch.float32, ulps=64, scale=None, msg=""):
    """actual equals expected up to rounding in `dtype`: every element within ulps * eps(dtype) *
    scale, where scale is max|expected| unless the caller knows the size of the terms that were
    summed to make it (a difference of large log-probabilities). The tolerance follows the scale of the whole compared tensor, not each element:
    two correct computations that sum in another order (another kernel, another CPU's vector width)
    differ by a few eps of the terms they add, which for an element that cancels to near 0 is a
    large relative error. 64 ulps: the deepest computations compared here (a few blocks forward and
    back) measured up to ~25 on AVX-512 and AVX2 CPUs alike."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    tol = ulps * torch.finfo(dtype).eps * scale
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert actual.shape == expected.shape and err <= tol, (
        f"{msg} max error {err:.3g} is {err / max(torch.finfo(dtype).eps * scale, 1e-300):.1f} ulps of "
        f"{dtype} at the scale {scale:.3g} (allowed {ulps})")


def small_args(**kw):
    """A model small enough for a written-out reference; GQA (4 heads over 2 KV heads)."""
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=48, max_seq_len=128)
    base.update(kw)
    return M.ModelArgs(**base)


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = M.Llama(small_args(**kw))
    m.init_weights(std=0.2)  # large weights so that mistakes show up in the logits
    return m


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct folder, built once per machine by ../shared/models/smollm2.sh."""
    script = os.path.join(SHARED, "models", "smollm2.sh")
    if not os.path.isfile(script):
        pytest.skip("../shared/models/smollm2.sh is absent")
    r = subprocess.run(["bash", script], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip(f"could not build SmolLM2: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture
def gsm8k_path():
    """../shared/data/gsm8k_train_alpaca.json; the test skips when ../shared/data is absent."""
    path = os.path.join(SHARED, "data", "gsm8k_train_alpaca.json")
    if not os.path.isfile(path):
        pytest.skip("../shared/data is absent")
    return path
