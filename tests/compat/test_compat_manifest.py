"""manifest.json -> ModelHost: a good manifest, and every problem reported together with its key."""
import json
import shutil

import pytest

from reactor_graph.compat import ModelHost, ModelLoadError, load_manifest, open_manifest
from reactor_graph.errors import GraphError

from .conftest import MODELS, Collector


def write(folder, data, model="prompt_model.py"):
    if model:
        shutil.copy(MODELS / model, folder / model)
    p = folder / "manifest.json"
    p.write_text(json.dumps(data, indent=2))
    return p


def test_the_example_manifest_opens_and_streams():
    host = open_manifest(MODELS / "manifest.json")
    assert isinstance(host, ModelHost)
    assert (host.name, host.version, host.fps, host.height, host.width) == ("prompt-model", "1.2.0", 12.0, 32, 32)
    assert host.manifest.manifest.runtime == ">=0.0.3"
    assert [s["name"] for s in host.command_schemas()] == ["set_prompt", "reset"]
    c = Collector().start(host, max_blocks=2)
    res = c.wait_end()
    assert res.ok and res.blocks == 2 and c.blocks[0].video().shape == (2, 48, 32)


def test_a_folder_works_as_the_path_and_weights_resolve_next_to_it(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"x")
    write(tmp_path, {"class": "prompt_model:PromptModel", "model_name": "p", "model_version": "2.0",
                     "args": {"size": 16}, "weights": ["ckpt/model.safetensors"], "extra_key": 1})
    lm = load_manifest(tmp_path)
    assert lm.weights == [tmp_path / "ckpt" / "model.safetensors"]
    assert lm.cls.__module__ == "prompt_model" and lm.root == tmp_path
    assert lm.manifest.model_extra == {"extra_key": 1}  # unknown keys are kept, not refused


def test_missing_class_and_weights_are_reported_together(tmp_path):
    p = write(tmp_path, {"class": "prompt_model:NoSuchModel", "model_name": "p", "args": {},
                         "weights": ["weights/missing.safetensors"]})
    with pytest.raises(GraphError) as info:
        open_manifest(p)
    msg = str(info.value)
    assert "2 problems" in msg
    assert "weights[0]: 'weights/missing.safetensors' does not exist" in msg and "never downloads" in msg
    assert "class: module 'prompt_model' has no 'NoSuchModel'; VideoModel classes there: PromptModel" in msg
    assert f"{p}:" in msg  # located in the file


def test_missing_module(tmp_path):
    p = write(tmp_path, {"class": "nowhere:Model", "model_name": "p"}, model=None)
    with pytest.raises(GraphError, match=r"class: cannot import module 'nowhere': no such module in "):
        load_manifest(p)


def test_bad_keys_and_args(tmp_path):
    p = write(tmp_path, {"class": "prompt_model.PromptModel", "fps": -1, "size": [16]})
    with pytest.raises(GraphError) as info:
        load_manifest(p)
    msg = str(info.value)
    assert "is not 'module:Class'" in msg and "fps" in msg and "size" in msg
    p = write(tmp_path, {"class": "prompt_model:PromptModel", "args": {"size": 16}})
    load_manifest(p)  # model_name is optional (the class name is used)

    (tmp_path / "strict.py").write_text(
        "from reactor_runtime import VideoModel\n"
        "class Strict(VideoModel):\n"
        "    def __init__(self, steps, size=16):\n"
        "        self.steps = steps\n"
        "    def start_session(self):\n"
        "        pass\n")
    p = write(tmp_path, {"class": "strict:Strict", "args": {"stepz": 4}}, model=None)
    with pytest.raises(GraphError) as info:
        load_manifest(p)
    msg = str(info.value)
    assert "args.stepz: Strict.__init__ takes no argument 'stepz'; it takes: size, steps" in msg
    assert "args.steps: Strict.__init__ needs 'steps'" in msg


def test_not_json_and_not_found(tmp_path):
    (tmp_path / "manifest.json").write_text('{"class": "a:B",\n oops}')
    with pytest.raises(GraphError, match=r"manifest.json:2: not valid JSON"):
        load_manifest(tmp_path)
    with pytest.raises(GraphError, match="file not found"):
        load_manifest(tmp_path / "nothing.json")


def test_init_failure_is_a_clear_load_error(tmp_path):
    (tmp_path / "broken.py").write_text(
        "from reactor_runtime import VideoModel\n"
        "class Broken(VideoModel):\n"
        "    def __init__(self, path='w.bin'):\n"
        "        raise FileNotFoundError(path)\n")
    p = write(tmp_path, {"class": "broken:Broken"}, model=None)
    with pytest.raises(ModelLoadError, match=r"Broken.__init__ failed: FileNotFoundError: w.bin \(at broken.py:4"):
        open_manifest(p)


def test_import_error_inside_the_module_is_named(tmp_path):
    (tmp_path / "needs.py").write_text("import some_missing_dependency\n")
    p = write(tmp_path, {"class": "needs:Model"}, model=None)
    with pytest.raises(GraphError, match="module 'needs' failed to import: ModuleNotFoundError: No module named "
                                         "'some_missing_dependency'"):
        load_manifest(p)


def test_manifest_folder_wins_over_a_module_of_the_same_name(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "prompt_model.py").write_text(
        "from reactor_runtime import VideoModel\n"
        "class PromptModel(VideoModel):\n"
        "    OTHER = True\n"
        "    def start_session(self):\n"
        "        pass\n")
    load_manifest(MODELS / "manifest.json")
    lm = load_manifest(write(other, {"class": "prompt_model:PromptModel"}, model=None))
    assert getattr(lm.cls, "OTHER", False)
    assert not getattr(load_manifest(MODELS / "manifest.json").cls, "OTHER", False)
