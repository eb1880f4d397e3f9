import os
import random

import pytest
import torch

# Without a GPU, the Triton backend's tests run its kernels in the Triton interpreter. Triton reads TRITON_INTERPRET
# when it is first imported (diffusers imports it), so it is set here, before any test module is collected. On CPU
# nothing else can run Triton kernels, so other tests are unaffected; a value set by the user is kept.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from diffusers_moc import ChunkLayout  # noqa: E402


def random_layout(rng: random.Random, text: bool | None = None) -> ChunkLayout:
    """A random layout: uneven chunk sizes, 1-4 shots (one-frame shots included), optional caption chunks."""
    n_shots = rng.randint(1, 4)
    sizes, shots, is_text = [], [], []
    with_text = rng.random() < 0.5 if text is None else text
    captions = []
    if with_text:
        if rng.random() < 0.7:
            captions.append((rng.randint(1, 5), -1))
        captions += [(rng.randint(1, 4), s) for s in range(n_shots) if rng.random() < 0.7]
    captions_first = rng.random() < 0.5
    if with_text and captions_first:
        for size, shot in captions:
            sizes.append(size), shots.append(shot), is_text.append(True)
    for s in range(n_shots):
        for _ in range(rng.randint(1, 3)):
            sizes.append(rng.randint(1, 6)), shots.append(s), is_text.append(False)
    if with_text and not captions_first:
        for size, shot in captions:
            sizes.append(size), shots.append(shot), is_text.append(True)
    return ChunkLayout.from_chunks(sizes, shots, is_text)


@pytest.fixture
def rng():
    return random.Random(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The training test files' common fixtures (they opt in with `pytestmark = pytest.mark.usefixtures(...)`).
@pytest.fixture(scope="module")
def _one_thread():
    # Tiny tensors: thread start-up dominates, and the test machine's cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def _fresh_accelerate_state():
    from _train_helpers import _reset_accelerate

    _reset_accelerate()
    yield
    _reset_accelerate()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two tiny clips and their metadata, shared by a test module's training runs."""
    from _train_helpers import _make_dataset

    return _make_dataset(tmp_path_factory.mktemp("clips"), n=2)
