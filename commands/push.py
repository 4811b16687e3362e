"""Publish an export on the Hugging Face Hub as it is, and the ``train.py push`` command.

    python train.py push --model runs/x/export --repo_id USER/NAME [--private true] [--revision R]
    python train.py push --model runs/x/sae --repo_id USER/NAME --dry_run true

The folder is uploaded whole with ``HfApi.upload_folder`` (the files ``upload_folder`` itself would upload: all but
``.git`` / ``.cache/huggingface``), after ``HfApi.create_repo(exist_ok=True)`` (and ``create_branch`` for a
revision). Not ``SentenceTransformer.push_to_hub``: on a new repo it writes its own generated card over embedlab's.
SAE folders go up in either layout: SAELens' (``cfg.json`` + ``sae_weights.safetensors``, the files
``sae_lens``' Hub loader reads) or sparsify's (``cfg.json`` + ``sae.safetensors``).

Before any upload the card's front matter is parsed as the Hub parses it (``huggingface_hub.metadata_load`` and
``ModelCard.load`` with metadata errors raised), so a card the Hub would reject fails here, with no network. A push
needs a token (``HF_TOKEN`` or ``huggingface-cli login``, as ``huggingface_hub.get_token`` finds it) and the hub
switched on (``HF_HUB_OFFLINE`` unset): both are checked first, in one line, before the folder is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse import ArgumentParser

from core.errors import DataError
from core.hub import hub_offline
from lightning_modules.saelens_format import WEIGHTS_FILE as SAELENS_WEIGHTS

#: What each kind of export holds: (kind, the files that identify it).
KINDS = (("sentence-transformers", ("modules.json",)), ("SAE, SAELens layout", ("cfg.json", SAELENS_WEIGHTS)),
         ("SAE, sparsify layout", ("cfg.json", "sae.safetensors")))
LOGIN_HINT = "set HF_TOKEN or run `huggingface-cli login`"


@dataclass
class PushPlan:
    """What a push uploads: the folder, its kind, every file (path in the repo, bytes), the card's metadata."""

    folder: Path
    kind: str
    files: list[tuple[str, int]]
    metadata: dict
    front_matter: str
    eval_results: int = 0
    url: str | None = None
    notes: list[str] = field(default_factory=list)


def check_can_upload() -> None:
    """Raise a one-line DataError when an upload cannot start: the hub switched off or no token."""
    from huggingface_hub import get_token

    if hub_offline():
        raise DataError(f"HF_HUB_OFFLINE is set: pushing needs the Hugging Face hub (unset it, and {LOGIN_HINT}); "
                        "--dry_run true shows what would be pushed without the network")
    if get_token() is None:
        raise DataError(f"no Hugging Face token: {LOGIN_HINT} (a token with write access); --dry_run true shows "
                        "what would be pushed without one")


def export_kind(folder: Path) -> str:
    """The kind of export ``folder`` holds (:data:`KINDS`), or a DataError naming what it lacks."""
    if not folder.is_dir():
        raise DataError(f"--model {folder}: not a folder (give a folder written by `train.py export`)")
    for kind, needed in KINDS:
        if all((folder / name).is_file() for name in needed):
            return kind
    raise DataError(f"--model {folder}: not an embedlab export (no modules.json, nor cfg.json with {SAELENS_WEIGHTS} "
                    "or sae.safetensors); export a checkpoint first with `train.py export`")


def upload_files(folder: Path) -> list[tuple[str, int]]:
    """(path in the repo, bytes) of every file ``HfApi.upload_folder`` uploads from ``folder``, sorted."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))
    return [(p, (folder / p).stat().st_size) for p in kept]


def read_card(folder: Path) -> tuple[dict, str, int]:
    """The card's metadata, its front matter text and the number of model-index results, parsed as the Hub parses
    them; a DataError when README.md is missing, has no front matter or one the Hub would reject."""
    from huggingface_hub import ModelCard, metadata_load

    readme = folder / "README.md"
    if not readme.is_file():
        raise DataError(f"{readme}: no model card; re-export the folder (`train.py export` writes one)")
    try:
        metadata = metadata_load(readme)
        card = ModelCard.load(readme, ignore_metadata_errors=False)
    except Exception as err:  # yaml / ValueError for a bad model-index: the Hub refuses the upload for the same
        raise DataError(f"{readme}: front matter the Hub would reject: {' '.join(str(err).split())}") from None
    if not metadata:
        raise DataError(f"{readme}: no YAML front matter (the Hub reads the library, tags and results from it)")
    text = card.content.split("---")[1].strip("\n")
    return metadata, text, len(getattr(card.data, "eval_results", None) or [])


def plan_push(model: str | Path) -> PushPlan:
    """Everything a push of ``model`` would upload, read from disk alone (no network)."""
    folder = Path(model).expanduser()
    kind = export_kind(folder)
    metadata, text, n_results = read_card(folder)
    plan = PushPlan(folder, kind, upload_files(folder), metadata, text, n_results)
    if kind == "sentence-transformers" and metadata.get("library_name") != "sentence-transformers":
        plan.notes.append("the card names no library_name: sentence-transformers (the Hub will not offer its loader)")
    return plan


def push(model: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False, api=None, commit_message: str | None = None) -> PushPlan:
    """Push the export ``model`` to the Hub model repo ``repo_id``, or plan it (``dry_run``: no network, no token).

    Args:
        model: a folder written by ``train.py export`` (sentence-transformers, or an SAE in either layout).
        repo_id: ``user/name`` or ``org/name``; created when missing (``private``: as a private repo; an existing
            repo keeps its visibility).
        revision: a branch to push to, created from the default branch when missing; None: the default branch.
        api: a ``huggingface_hub.HfApi`` (tests pass a recorder); None builds one.
        commit_message: the commit's message; default names the export kind and folder.

    Returns:
        The plan, with ``url`` (the repo, or its branch) set after an upload.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise DataError(f"--repo_id {repo_id!r}: {' '.join(str(err).split())}") from None
    if "/" not in repo_id:
        raise DataError(f"--repo_id {repo_id!r}: give it as USER/NAME or ORG/NAME")
    if not dry_run:
        check_can_upload()  # before the folder is read: a push that cannot happen says so at once
    plan = plan_push(model)
    if dry_run:
        return plan
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi()
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(plan.folder), repo_type="model", revision=revision,
                          commit_message=commit_message or f"embedlab export ({plan.kind}) from {plan.folder.name}")
    except (HfHubHTTPError, OSError) as err:  # 401 / 403 / 404 / a refused upload / no route: one line
        raise DataError(f"push to {repo_id} failed: {' '.join(str(err).split())[:300]}") from None
    plan.url = str(repo) + (f"/tree/{revision}" if revision else "")
    return plan


def format_plan(plan: PushPlan, repo_id: str, private: bool, revision: str | None, dry_run: bool) -> str:
    """What ``train.py push`` prints: every file, the card's front matter, and the URL (or the would-be one)."""
    from huggingface_hub import constants

    total = sum(size for _, size in plan.files)
    where = plan.url or f"{constants.ENDPOINT}/{repo_id}" + (f"/tree/{revision}" if revision else "")
    head = ("dry run (nothing uploaded, no network): would push" if dry_run else "pushed")
    lines = [f"{head} {plan.folder} ({plan.kind}) -> {where}" + (" (private)" if private else ""),
             f"files ({len(plan.files)}, {total / 1e6:.2f} MB):",
             *[f"  {path}  {size:,} bytes" for path, size in plan.files],
             f"card front matter (parsed by huggingface_hub.ModelCard; {plan.eval_results} model-index results):",
             "---", plan.front_matter, "---", *[f"note: {n}" for n in plan.notes]]
    return "\n".join(lines)


def push_main(argv: list[str]) -> PushPlan:
    """``push --model DIR --repo_id USER/NAME [--private] [--revision R] [--dry_run]``: upload an export folder
    (sentence-transformers, or an SAE in either layout) to the Hugging Face Hub as it is, card included."""
    parser = ArgumentParser(prog="train.py push", description=push_main.__doc__)
    parser.add_argument("--model", type=str, required=True, help="a folder written by `train.py export`")
    parser.add_argument("--repo_id", type=str, required=True, help="USER/NAME or ORG/NAME (created when missing)")
    parser.add_argument("--private", type=bool, default=False, help="create the repo private")
    parser.add_argument("--revision", type=str | None, default=None, help="branch to push to (created when missing)")
    parser.add_argument("--dry_run", type=bool, default=False, help="list the files and the card; no network")
    parser.add_argument("--commit_message", type=str | None, default=None)
    args = parser.parse_args(argv)
    plan = push(args.model, args.repo_id, args.private, args.revision, args.dry_run,
                commit_message=args.commit_message)
    print(format_plan(plan, args.repo_id, args.private, args.revision, args.dry_run))
    return plan
