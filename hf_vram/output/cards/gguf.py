"""The model card's GGUF section, written by `hf-vram export --gguf` (and `merge --gguf`) into an existing card.

The card is rendered when training ends; the export comes later, so its section is kept between two markers and
replaced on every export, leaving the rest of the card as it was.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from data_prep.atomic import atomic_write_text

START, END = "<!-- hf-vram:gguf -->", "<!-- /hf-vram:gguf -->"


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def gguf_section(card_dir: Path, files: list, modelfile: Path, model_ref: str, prompt: str, laid_out: str) -> str:
    """Markdown: the files with their tensor types, and how llama.cpp, Ollama and transformers load them. `prompt`
    is a bare question (Ollama applies the TEMPLATE), `laid_out` the same in the training layout (llama-cli raw)."""
    rel = [f.path.relative_to(card_dir).as_posix() for f in files]
    rows = "\n".join(
        f"| `{r}` | {', '.join(f'{k} x{n}' for k, n in f.types.items())} | {_size(f.path)} |" for r, f in zip(rel, files)
    )
    name = Path(model_ref).name
    modelfile_rel = modelfile.relative_to(card_dir).as_posix()
    return f"""{START}
## GGUF (llama.cpp, Ollama)

| file | tensor types | size |
|---|---|---|
{rows}

`{modelfile_rel}` (Ollama) names `{Path(rel[0]).name}` and carries the prompt layout of training, its stop tokens and
its context length:

```sh
ollama create {name} -f {modelfile_rel}
ollama run {name} {json.dumps(prompt)}
```

llama.cpp, with the prompt laid out as in training:

```sh
llama-cli -m {rel[0]} -no-cnv -n 64 -p {shlex.quote(laid_out)}
```

transformers reads the file too (dequantized to the dtype asked for):

```python
{_transformers_code(model_ref, rel[0])}
```
{END}"""


def _transformers_code(model_ref: str, rel: str) -> str:
    # From the file's own folder: given the output's folder, transformers (5.24) finds adapter_config.json there
    # and looks for the GGUF in the adapter's base instead. One snippet for the folder and the Hub repository:
    # `hf-vram push` rewrites the model_id line.
    return (
        "import os\n\nfrom huggingface_hub import hf_hub_download\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model_id = {json.dumps(model_ref)}\n"
        f"path = os.path.join(model_id, {json.dumps(rel)}) if os.path.isdir(model_id) else "
        f"hf_hub_download(model_id, {json.dumps(rel)})\n"
        "model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))\n"
        "tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))"
    )


def add_gguf_section(readme: Path, section: str) -> None:
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(readme, text)
