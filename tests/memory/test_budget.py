import pytest

from autoqra.memory.budget import parse_size, resolve_budget
from autoqra.memory.model import MemoryModel
from autoqra.space import SearchSpace


@pytest.mark.parametrize(
    "text, value",
    [("3.5GB", 3_500_000_000), ("900MiB", 900 * 2**20), ("1e6", 1_000_000), ("12 kb", 12_000), ("7", 7)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["3.5 parsecs", "GB", "", "-1GB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(bad)


def test_references_and_minimum(tiny):
    sp = SearchSpace.from_model(tiny, bits=(16,), ranks=(0, 4, 8))
    mm = MemoryModel(tiny, sp, "none")
    ref16 = resolve_budget("16bit", mm)
    assert ref16 == mm.predict(sp.uniform(16, 8)).model_bytes
    assert resolve_budget(ref16, mm) == ref16
    minimum = mm.predict(sp.minimum()).model_bytes
    with pytest.raises(ValueError, match=f"{minimum:,} bytes"):
        resolve_budget(minimum - 1, mm)
    with pytest.raises(ValueError, match="target"):
        resolve_budget("16bit", mm, target="disk")
    train_ref = resolve_budget("16bit", mm, target="train")
    assert train_ref == mm.predict(sp.uniform(16, 8)).train_bytes > ref16
