"""MLflow logging: one parent run per update check, one child run per stage or candidate.

Stages run as separate processes (``dvc repro``), so they find their parent run by a key instead
of sharing a Python object: the key is a digest of the validated params and the code revision.
Re-running the same configuration logs into the same parent; any change to params or code gives
a new parent. Children are found the same way (tags ``rcat.pipeline_key`` + ``rcat.child``).

Metric names are one scheme for every candidate, so the MLflow UI compares them side by side:
``<split>/<metric>`` (e.g. ``test/rnfr``, ``validation/robust_accuracy_new``), training curves as
``train/<term>`` with the epoch as step; an undefined rate is logged as NaN so that every
candidate run has the same keys, and :func:`candidate_filter` selects one row per candidate in
``mlflow.search_runs``. Each candidate run also holds its flip set as an MLflow table
(``flips/<candidate>.json``). The decision is stored as tags on the parent run, with
``decision.json``, the trade-off plot (``plots/tradeoff.png``) and the registry step's
``registry.json`` (:mod:`rcat.registry`) as artifacts.

Only the driving process logs (never parallel workers): SQLite stores lock under concurrent writers.

Failing fast: MLflow's HTTP client retries a dead server for minutes by default (7 retries with
exponential backoff, 120 s timeout per request). :class:`Tracker` lowers those defaults (only where
the environment does not set them) and retries each call itself a bounded number of times
(:data:`ATTEMPTS`, short backoff). A call that still fails raises
:class:`~rcat.errors.TrackingUnavailable` (or :class:`~rcat.errors.TrackingError` for a request the
store refused) with one line naming the URI. Stages log only after writing their outputs, so the
outputs are complete when this happens.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rcat.config import Params, TrackingConfig
from rcat.errors import InputError, TrackingError, TrackingUnavailable
from rcat.runtime import code_revision
from rcat.safe_io import sha256_json

PIPELINE_KEY_TAG = "rcat.pipeline_key"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment of this kind on its runs (untagged ones open on GenAI traces)."""
CHILD_TAG = "rcat.child"

ATTEMPTS = 3
"""Attempts per MLflow call before giving up (connection errors, timeouts, 5xx, locked SQLite)."""
BACKOFF_SECONDS = (0.5, 1.0)
"""Pause before the second and the third attempt."""
HTTP_DEFAULTS = {
    # MLflow's own retry layer is switched off: :meth:`Tracker._call` retries instead, boundedly.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    # per request (connect and read); a server that accepts connections but never answers
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""MLflow HTTP client settings applied with ``os.environ.setdefault``: the environment wins."""


def project_root(start: Path | None = None) -> Path:
    """The project a process works for: the working directory, or, inside a DVC experiment's temporary
    workspace (``dvc exp run --temp`` / ``--queue`` run in ``<project>/.dvc/tmp/exps/...``), the project
    that workspace belongs to, so that its runs land in the project's own store."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for index in range(len(parts) - 2):
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:index])
    return here


def tracking_uri(config: TrackingConfig, root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the params' URI (default ``sqlite:///mlflow.db``); a relative
    SQLite path is made absolute under ``root`` (default :func:`project_root`: temporary and queued DVC
    experiments included). The one rule for every caller: stages, the command line and the flows."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///":
        relative, query = (uri[len("sqlite:///"):].split("?", 1) + [""])[:2]
        base = project_root(root) if root is not None else project_root()
        return f"sqlite:///{(base / relative).as_posix()}" + (f"?{query}" if query else "")
    return uri


def check_sqlite_store(uri: str) -> None:
    """A mistyped SQLite URI must not silently start an empty MLflow store.

    ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` only; its directory must exist. When
    the file does not exist yet, one line on stderr says that a new store is created where (a
    typo then shows at once, instead of as a registry without its champion).
    """
    if not uri.startswith("sqlite:"):
        return
    if not uri.startswith("sqlite:///") or uri == "sqlite:///":
        raise InputError(f"tracking.uri {uri!r}: an SQLite store is 'sqlite:///relative/path.db' or 'sqlite:////absolute/path.db' (three or four slashes)")
    path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if not path.parent.is_dir():
        raise InputError(f"tracking.uri {uri!r}: directory {path.parent} does not exist; fix the path or create the directory")
    if not path.exists():
        sys.stderr.write(f"rcat: note: no MLflow store at {path}; creating a new, empty one (tracking.uri {uri})\n")
        return
    try:
        with open(path, "rb") as handle:
            header = handle.read(16)
    except OSError as exc:
        raise InputError(f"tracking.uri {uri!r}: cannot read {path} ({exc.strerror or exc})") from None
    if header and header != b"SQLite format 3\x00":
        # else SQLAlchemy's "file is not a database" reads as a store that "did not answer", three times
        raise InputError(f"tracking.uri {uri!r}: {path} is not an SQLite database (corrupt, or another file); "
                         "restore it from a backup, or point tracking.uri at the right file")


def redact_uri(uri: str) -> str:
    """The URI without a ``user:password@`` part, safe to print."""
    return re.sub(r"(?<=://)[^/@]*@", "***@", uri)


def _is_tracking_failure(exc: BaseException) -> bool:
    """Exceptions that mean "the tracking store failed", as opposed to a bug in rcat."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (MlflowException, OSError)):
        return True
    try:
        import requests

        if isinstance(exc, requests.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests ships with mlflow
        pass
    try:
        from sqlalchemy.exc import SQLAlchemyError

        return isinstance(exc, SQLAlchemyError)
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        return False


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: no answer, a timeout, a server error, a locked database; not a refused request."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return True


def _short_cause(exc: BaseException) -> str:
    """The gist of an MLflow/requests error in a few words (their messages nest whole reprs)."""
    text = " ".join(str(exc).split())
    errno = re.search(r"\[Errno -?\d+\] [^\"'):]+", text)
    if errno:
        return errno.group(0).strip()
    if "timeout" in text.lower() or "timed out" in text.lower():
        return "timed out"
    return text[:200] + ("…" if len(text) > 200 else "") or type(exc).__name__


def pipeline_key(params: Params, revision: str) -> str:
    """Digest of the validated params and the code revision: identifies one pipeline configuration."""
    return sha256_json({"params": params.model_dump(mode="json"), "code": revision})[:16]


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts to ``a/b`` keys, keeping numbers; an undefined rate (NaN, or ``None`` as read from JSON) is NaN.

    Undefined rates are logged as NaN, not dropped, so that every candidate run carries the same
    metric keys (MLflow's SQL stores and its REST API keep NaN). Infinities are dropped.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif value is None:
            flat[name] = math.nan
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isinf(value):
            flat[name] = float(value)
    return flat


class RunLogger:
    """Thin handle on one MLflow run (the client API, no global active-run state)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(str(k), str(v)[:6000]) for k, v in values.items() if str(k) not in existing]
        if fresh:
            self.client.log_batch(self.run_id, params=fresh)

    def metrics(self, values: Mapping[str, Any], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [Metric(k, v, timestamp, step) for k, v in flatten_metrics(values).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def tags(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)[:5000]) for k, v in values.items()])

    def artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def table(self, frame: Any, artifact_file: str) -> None:
        """Log a DataFrame as an MLflow table (``artifact_file`` ends in ``.json``), replacing an earlier one.

        Same file format and ``mlflow.loggedArtifacts`` tag as ``MlflowClient.log_table``, which
        *appends* to an existing file: a rerun of a stage would double the table.
        """
        import json
        import posixpath
        import tempfile

        directory, filename = posixpath.split(posixpath.normpath(artifact_file))
        with tempfile.TemporaryDirectory(prefix="rcat-table-") as tmp:
            local = Path(tmp) / filename
            frame.to_json(local, orient="split", index=False, date_format="iso")
            self.client.log_artifact(self.run_id, str(local), directory or None)
        logged = json.loads(self.client.get_run(self.run_id).data.tags.get("mlflow.loggedArtifacts", "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in logged:
            self.tags({"mlflow.loggedArtifacts": json.dumps([*logged, entry])})

    def rename(self, name: str) -> None:
        """Set the run's name, as the MLflow UI lists it."""
        self.client.update_run(self.run_id, name=name)

    def figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure as an image artifact (``artifact_file`` ends in ``.png``)."""
        self.client.log_figure(self.run_id, figure, artifact_file)


class NullLogger(RunLogger):
    """Used when tracking is disabled: accepts every call and does nothing."""

    def __init__(self) -> None:
        super().__init__(None, "")

    def params(self, values: Mapping[str, Any]) -> None: ...
    def metrics(self, values: Mapping[str, Any], step: int = 0) -> None: ...
    def tags(self, values: Mapping[str, Any]) -> None: ...
    def artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None: ...
    def table(self, frame: Any, artifact_file: str) -> None: ...
    def figure(self, figure: Any, artifact_file: str) -> None: ...
    def rename(self, name: str) -> None: ...


class _GuardedClient:
    """An ``MlflowClient`` whose every method goes through :meth:`Tracker._call` (bounded retry, clear error)."""

    def __init__(self, client: Any, tracker: Tracker) -> None:
        self._inner = client
        self._tracker = tracker

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: self._tracker._call(attribute, *args, **kwargs)


class Tracker:
    """Finds or creates the parent run of this pipeline configuration and its child runs.

    Every MLflow call is retried at most :data:`ATTEMPTS` times; a tracking store that still fails
    raises :class:`~rcat.errors.TrackingUnavailable` / :class:`~rcat.errors.TrackingError`.
    """

    def __init__(self, params: Params, root: str | Path = ".") -> None:
        self.params = params
        self.config = params.tracking
        self.revision = code_revision(root)
        self.key = pipeline_key(params, self.revision)
        self._client: Any = None
        self._experiment_id: str | None = None
        self._logging: str | None = None  # the run being logged, for error messages

    @property
    def uri(self) -> str:
        return tracking_uri(self.config)

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``function`` (an MLflow client method); retry transient failures, then raise one clear error."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return function(*args, **kwargs)
            except Exception as exc:
                if not _is_tracking_failure(exc):
                    raise
                if _is_transient(exc) and attempt < ATTEMPTS:
                    time.sleep(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS)) - 1])
                    continue
                raise self._failure(exc, attempt) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _failure(self, exc: BaseException, attempts: int) -> TrackingError:
        where = f" while logging {self._logging!r}" if self._logging else ""
        fix = ("the stage's outputs were written completely, only their MLflow logging is missing; "
               "start the tracking server (or point MLFLOW_TRACKING_URI at a running one), "
               "or set tracking.enabled: false in params.yaml")
        uri = redact_uri(self.uri)
        if _is_transient(exc):
            return TrackingUnavailable(f"MLflow tracking at {uri} did not answer after {attempts} attempts ({_short_cause(exc)}){where}; {fix}")
        return TrackingError(f"MLflow tracking at {uri} refused a request ({_short_cause(exc)}){where}; {fix}")

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def client(self) -> Any:
        """The connected ``MlflowClient`` (every call retried boundedly); for the registry step."""
        self._connect()
        return self._client

    def _connect(self) -> None:
        if self._client is not None:
            return
        os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        check_sqlite_store(self.uri)
        client = _GuardedClient(self._call(MlflowClient, tracking_uri=self.uri), self)
        experiment = client.get_experiment_by_name(self.config.experiment)
        if experiment is None:
            self._experiment_id = client.create_experiment(self.config.experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            self._experiment_id = experiment.experiment_id
            if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # an experiment made before rcat tagged them
                client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self._client = client  # only once connected: a failed connect is retried by the next call

    def _find(self, extra_filter: str) -> str | None:
        runs = self._client.search_runs(
            [self._experiment_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{self.key}' AND {extra_filter}", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def parent(self) -> RunLogger:
        """The parent run of this configuration (created with params and code revision on first use)."""
        if not self.enabled:
            return NullLogger()
        self._connect()
        run_id = self._find(f"tags.`{CHILD_TAG}` = '__parent__'")
        if run_id is None:
            run = self._client.create_run(
                self._experiment_id,
                run_name=f"check {time.strftime('%Y-%m-%d')} running ({self.key[:8]})",  # renamed by decide: check DATE VERDICT CANDIDATE
                tags={PIPELINE_KEY_TAG: self.key, CHILD_TAG: "__parent__", "rcat.code_revision": self.revision},
            )
            run_id = run.info.run_id
            logger = RunLogger(self._client, run_id)
            logger.params(flatten_params(self.params.model_dump(mode="json")))
            return logger
        return RunLogger(self._client, run_id)

    @contextlib.contextmanager
    def child(self, name: str, kind: str) -> Iterator[RunLogger]:
        """A child run named ``name`` (``kind`` is ``stage`` or ``candidate``), finished or failed on exit."""
        if not self.enabled:
            yield NullLogger()
            return
        self._logging = name
        parent = self.parent()
        run_id = self._find(f"tags.`{CHILD_TAG}` = '{name}'")
        if run_id is None:
            run = self._client.create_run(
                self._experiment_id,
                run_name=name,
                tags={PIPELINE_KEY_TAG: self.key, CHILD_TAG: name, "rcat.kind": kind, "mlflow.parentRunId": parent.run_id, "rcat.code_revision": self.revision},
            )
            run_id = run.info.run_id
        else:
            self._client.update_run(run_id, status="RUNNING")
        logger = RunLogger(self._client, run_id)
        try:
            yield logger
        except TrackingError:
            raise  # the store is failing: marking the run FAILED would fail (and retry) too
        except BaseException:
            with contextlib.suppress(TrackingError):  # keep the original error
                self._client.set_terminated(run_id, status="FAILED")
            raise
        self._client.set_terminated(run_id, status="FINISHED")
        self._logging = None

    def has_child(self, name: str) -> bool:
        """Whether this check's parent run already has a child run called ``name``."""
        if not self.enabled:
            return False
        self.parent()
        return self._find(f"tags.`{CHILD_TAG}` = '{name}'") is not None

    def finish_parent(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._client.set_terminated(self.parent().run_id, status=status)


def candidate_filter(parent_run_id: str) -> str:
    """``search_runs`` filter for one update check's candidate runs: one row per candidate, same metric keys.

    e.g. ``mlflow.search_runs(experiment_names=["rcat-digits"], filter_string=candidate_filter(parent_id))``
    """
    return f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`rcat.kind` = 'candidate'"


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested params to dotted keys, as MLflow shows them (``finetune.methods.rcat.alpha``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat
