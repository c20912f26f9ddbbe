"""The dialect tables of qforge.train.recipes: every key is read one way only, and every field a
table names is a TrainConfig field."""
import pytest

from qforge.train.config import TrainConfig
from qforge.train.recipes import _Axolotl, _LlamaFactory


@pytest.mark.parametrize("mapper", [_Axolotl, _LlamaFactory])
def test_each_key_has_one_reader_and_names_a_real_field(mapper):
    methods = {name[len("key_"):] for name in dir(mapper) if name.startswith("key_")}
    tables = [set(mapper.FIELDS), methods, set(mapper.IGNORED), set(mapper.OFF_ONLY)]
    for i, a in enumerate(tables):
        for b in tables[i + 1:]:
            assert not a & b, f"{mapper.dialect}: {sorted(a & b)} read two ways"
    assert {field for field, _ in mapper.FIELDS.values()} <= set(TrainConfig.field_names())
