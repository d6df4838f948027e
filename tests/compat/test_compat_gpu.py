"""CUDA: tensors a model emits on the GPU stay there through conversion (Triton yuv420p) and the node."""
import numpy as np
import pytest
import torch

from reactor_graph.compat import ModelHost, VideoModel, get_ctx

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class CudaModel(VideoModel):
    def __init__(self, size=32, frames=4, layout="nchw"):
        g = torch.Generator(device="cuda").manual_seed(0)
        self.blocks = [torch.rand(frames, 3, size, size, device="cuda", generator=g) * 2 - 1 for _ in range(3)]
        self.layout = layout

    def start_session(self):
        i = 0
        while not get_ctx().should_stop():
            b = self.blocks[i % 3]
            get_ctx().emit_block(b if self.layout == "nchw" else b.permute(0, 2, 3, 1))
            i += 1


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_blocks_convert_on_the_device(layout):
    from reactor_graph.kernels.colour import rgb_to_yuv420p_reference

    model = CudaModel(layout=layout)
    host = ModelHost(model)
    blocks = []
    res = host.run_session(blocks.append, max_blocks=3, timeout=30)
    assert res.ok and res.blocks == 3
    for i, b in enumerate(blocks):
        want = rgb_to_yuv420p_reference(model.blocks[i].cpu()).numpy().astype(int)
        got = b.video().astype(int)
        assert got.shape == (4, 48, 32) and np.abs(got - want).max() <= 1


def test_cuda_model_node_in_a_cuda_graph(write_graph, tmp_path):
    from reactor_graph.loop import Engine
    from reactor_graph.plan import load_plan

    (tmp_path / "cuda_model.py").write_text(
        "import torch\n"
        "from reactor_runtime import VideoModel, get_ctx\n"
        "class M(VideoModel):\n"
        "    def start_session(self):\n"
        "        while not get_ctx().should_stop():\n"
        "            get_ctx().emit_block(torch.zeros(3, 3, 32, 32, device='cuda'))\n")
    path = write_graph("""\
        reactor-graph: 1
        name: cuda
        size: [32, 32]
        device: cuda
        nodes:
          model: {type: reactor_model, params: {class: "cuda_model:M", frames: 2, output: float}}
          out: {type: emit, in: {frames: model.frames}}
        """)
    eng = Engine(load_plan(path), compile="eager").load()
    blocks = []
    res = eng.run_session(blocks.append, max_blocks=4)
    assert res.ok, res.error
    assert blocks[0].video().shape == (2, 48, 32)
    assert eng.nodes["model"]._last.is_cuda
