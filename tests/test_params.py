import pytest

from socialmae.data.crop import CropParams
from socialmae.params import ParamsError, from_mapping, section


def test_sections_parse_into_typed_dataclasses(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("crop:\n  frame_rate: 5\n  detector_weights: null\n  workers: 1\n")
    crop = section(CropParams, path, "crop")
    assert crop.frame_rate == 5.0 and isinstance(crop.frame_rate, float)
    assert crop.workers == 1 and crop.detector_weights is None
    assert section(CropParams, path, "missing_section") == CropParams()


@pytest.mark.parametrize(
    "mapping, key, reason",
    [
        ({"framerate": 4}, "crop.framerate", "unknown key"),
        ({"frame_rate": "fast"}, "crop.frame_rate", "expected a number, got 'fast'"),
        ({"workers": 1.5}, "crop.workers", "expected an integer"),
        ({"workers": True}, "crop.workers", "expected an integer"),
        ({"frame_rate": -1}, "crop", "frame_rate"),
        ({"detector_weights": 3}, "crop.detector_weights", "expected a string"),
    ],
)
def test_bad_params_name_the_key(mapping, key, reason):
    with pytest.raises(ParamsError, match=reason) as info:
        from_mapping(CropParams, mapping, "crop")
    assert info.value.key == key


def test_bad_files(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        section(CropParams, tmp_path / "nope.yaml", "crop")
    bad = tmp_path / "bad.yaml"
    bad.write_text("crop: [1, 2\n")
    with pytest.raises(ParamsError, match="invalid YAML"):
        section(CropParams, bad, "crop")
    with pytest.raises(ParamsError, match="expected a mapping"):
        bad.write_text("crop: 3\n")
        section(CropParams, bad, "crop")
