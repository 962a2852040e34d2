"""`hf-vram push`: upload a trained output directory and its model card to the Hugging Face Hub.

huggingface_hub does the work (create_repo, upload_folder) and finds the token itself (HF_TOKEN, then the
`hf auth login` cache); hf-vram never reads, prints or logs it. What is added here: the repository and its
visibility come from the output's resolved recipe, files that only serve training stay local, the card's
usage line names the repository pushed to, and Hub failures a user can fix become UserErrors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from hf_vram.errors import UserError

# A saved model (transformers), a saved adapter (peft) or a saved pipeline (diffusers).
OUTPUT_MARKERS = ("config.json", "adapter_config.json", "model_index.json")

# Files that serve training or resuming only; the model, tokenizer, card, resolved recipe and
# train_summary.json are what a reader of the repository needs. TensorBoard logs (runs/, or logs/ of a diffusion
# run) are kept: they are small, and the Hub shows them as the repository's training metrics; so are a diffusion
# run's sample grids (samples/), which show what the model draws.
IGNORE_PATTERNS = [
    "checkpoint-*",  # resumable checkpoints (optimizer states: several times the model's size)
    ".checkpoint-*",  # a diffusion checkpoint still being written (renamed to checkpoint-N once complete)
    "tokenizer-trained/*",  # the training-time copy; the output's own tokenizer files sit beside the model
    "prepared/*",  # tokenized data cache
    "score_before.json",  # kept for resuming; the card and train_summary.json hold both scores
    "eval_before.json",  # likewise for the held-out metrics
    "lm_eval_before.json",  # likewise for the lm-eval scores of the starting model (eval.tasks_before)
    "merged/*",  # `hf-vram merge`'s default destination: a full model, pushed on its own if wanted
    "progress.json",  # a running training's step and ETA (hf_vram/output/progress.py); loss.png is pushed
    "STOP",  # a stop request (hf_vram/output/stop.py)
    "ui-run.json",  # the UI's record of the process it started (hf_vram/ui/runs.py)
    "ui-run.log",  # that process's console output
    "*.lock",
    "*.tmp",
    "*.tmp-*",  # data_prep.atomic's temporaries, left by a kill mid-write
    "*/.*.tmp-*",
    ".*.tmp-*",
]

# The usage snippet of the card written by hf_vram/output/cards/ names the model in one line: model_id = "..."
_USAGE_MODEL = re.compile(r'(^model_id = )"(?:[^"\\\n]|\\.)*"', re.MULTILINE)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _saved_recipe(out: Path) -> dict:
    """The output's resolved recipe as plain data (read without the schema, so that an output saved by an
    older hf-vram still pushes)."""
    path = out / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _run_name(out: Path) -> str:
    try:
        return str(json.loads((out / "train_summary.json").read_text())["recipe"])
    except (OSError, ValueError, KeyError, TypeError):
        return out.name


def _check_output(out: Path) -> None:
    if not out.is_dir():
        raise UserError(f"push: '{out}' is not a directory; give the output directory of a run (`hf-vram train RECIPE` first)")
    if not any((out / name).is_file() for name in OUTPUT_MARKERS):
        raise UserError(
            f"push: '{out}' is not a trained output (no {', '.join(OUTPUT_MARKERS[:-1])} or {OUTPUT_MARKERS[-1]}); "
            "run `hf-vram train RECIPE` first and push its output directory (outputs/<recipe> or train.output_dir)"
        )


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = None if _REPO_ID.fullmatch(repo_id) else "expected owner/name"
    if problem is None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            problem = str(e)
    if problem:
        raise UserError(
            f"push: repository id '{repo_id}' is not valid ({problem}); give it as owner/name, e.g. --repo my-user/my-model"
        )


def _name_repo_in_card(out: Path, repo_id: str) -> None:
    """Point the card's usage line at the repository pushed to. The card is edited in place (not regenerated)
    so that edits made to it by hand are kept, and the local card names where the output now lives."""
    from data_prep.atomic import atomic_write_text

    card = out / "README.md"
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8")
    new = _USAGE_MODEL.sub(lambda m: m.group(1) + json.dumps(repo_id), text)
    if new != text:
        atomic_write_text(card, new)


def _auth_error(status: int, endpoint: str, repo_id: str) -> UserError:
    if status == 401:
        why = f"the Hub at {endpoint} did not accept the request: no token was found, or the token is invalid"
    else:
        why = f"the Hub at {endpoint} refused to let this token write to '{repo_id.split('/')[0]}/'"
    return UserError(
        f"push: {why}. Log in with `hf auth login` (a token with write access), or set HF_TOKEN in the environment."
    )


def push_output(output_dir: str | Path, repo_id: str | None = None, private: bool | None = None) -> str:
    """Create (or reuse) the Hub model repository and upload the output directory to it; returns its URL.

    repo_id None: the output recipe's hub.repo_id. private None: the recipe's hub.private (private when the
    output has no recipe). An existing repository keeps its visibility.
    """
    out = Path(output_dir)
    _check_output(out)
    hub = _saved_recipe(out).get("hub") or {}
    repo_id = repo_id or hub.get("repo_id")
    if not repo_id:
        raise UserError(
            f"push: no repository for '{out}': pass --repo owner/name, or set hub.repo_id in the recipe "
            "(it is saved in the output's recipe.yaml)"
        )
    _check_repo_id(repo_id)
    if private is None:
        private = hub.get("private") is not False  # private unless the recipe says otherwise

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx  # the HTTP client huggingface_hub uses, whatever its version

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        _name_repo_in_card(out, repo_id)
        api.upload_folder(
            folder_path=out,
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload {_run_name(out)} trained with hf-vram",
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except LocalTokenNotFoundError:
        raise _auth_error(401, api.endpoint, repo_id) from None
    except OfflineModeIsEnabled:
        raise UserError("push: HF_HUB_OFFLINE is set; unset it (or set HF_HUB_OFFLINE=0) to push to the Hub") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise _auth_error(status, api.endpoint, repo_id) from None
        raise
    except httpx.TransportError as e:
        raise UserError(f"push: cannot reach the Hub at {api.endpoint} ({type(e).__name__}: {e})") from None
    return str(url)
