"""``glmrun.notebook.display_chat`` in a real Jupyter kernel: the answer streams in as Markdown."""

from __future__ import annotations

import pytest

from .test_real_model import GGUF  # noqa: F401 - skips the module when the embedded model is absent

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_display_chat_streams_markdown_and_returns_history():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import glmrun\nfrom glmrun.notebook import display_chat\nmodel = glmrun.load(device='cpu', progress=False)"
        ),
        nbformat.v4.new_code_cell(
            "history = display_chat(model, 'What is the capital of France?', do_sample=False, max_new_tokens=24)"
        ),
        nbformat.v4.new_code_cell("print(len(history), 'Paris' in history[-1][1])"),
    ]
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3")
    client.execute()
    outputs = nb.cells[1].outputs
    markdown = [o for o in outputs if o.get("output_type") == "display_data" and "text/markdown" in o.get("data", {})]
    assert markdown, outputs
    # the display was updated in place as tokens arrived: the final Markdown holds the whole answer
    assert "Paris" in markdown[-1]["data"]["text/markdown"]
    assert nb.cells[2].outputs[0]["text"].strip() == "1 True"
