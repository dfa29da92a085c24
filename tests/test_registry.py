import pytest
from alignkit.experiment import load_experiment
def test_unknown_adapter_option_names_key_and_valid_ones():
    with pytest.raises(ValueError, match=r"student.options.poolng' \(valid: .*pooling"):
        load_experiment("configs/ts/japanese_vowels.yaml", ["student.options.poolng=last"])
def test_mistyped_and_out_of_range_options():
    with pytest.raises(ValueError, match=r"student.options.keep_layers"):
        load_experiment("configs/ts/japanese_vowels.yaml", ["student.options.keep_layers=many"])
    with pytest.raises(ValueError, match=r"student.options.pooling='first': must be one of mean, last"):
        load_experiment("configs/ts/japanese_vowels.yaml", ["student.options.pooling=first"])
def test_options_are_typed_after_loading():
    cfg = load_experiment("configs/ts/japanese_vowels.yaml", ["student.options.pooling=last"])
    assert cfg.student.options.pooling == "last" and type(cfg.student.options).__name__ == "HFTimeSeriesOptions"
