"""Downloads from the HuggingFace Hub, shared by export (checkpoints) and serve (pre-exported ONNX).

huggingface_hub already honours ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``; this module only
turns its exceptions into ours, so that the CLI and the server say what went wrong in one sentence.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastllm.errors import SourceNotFoundError

# "org/name" as the hub spells repo ids; anything else is treated as a local path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.endswith((".gguf", ".onnx", ".json"))


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
) -> Path:
    """Snapshot a repo into the HF cache and return its local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        )
    except GatedRepoError:
        if token:
            message = (f"{repo_id} is gated and the hub token in use has no access to it: accept its licence "
                       f"on the hub page of {repo_id} with the account that token belongs to")
        else:
            message = f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN to a token with access"
        raise SourceNotFoundError(message, code="gated_repo") from None
    except RepositoryNotFoundError:
        hint = "the hub token in use cannot see it" if token else "set HF_TOKEN"
        raise SourceNotFoundError(
            f"model {repo_id!r} was not found on the hub (or it is private: {hint})"
        ) from None
    except RevisionNotFoundError:
        raise SourceNotFoundError(f"revision {revision!r} of {repo_id} does not exist") from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set"
        else:
            why = f"the hub ({constants.ENDPOINT}) cannot be reached"
        raise SourceNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and {why}; download it once while online"
        ) from None
    except HfHubHTTPError as exc:
        raise SourceNotFoundError(f"the hub refused {repo_id}: {_first_line(exc)}") from None
    except OSError as exc:  # requests' SSL/proxy errors, which huggingface_hub re-raises as they are
        raise SourceNotFoundError(f"cannot download {repo_id} from the hub: {_first_line(exc)}") from None
    return Path(folder)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
