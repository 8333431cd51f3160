"""The composition root: turns `Settings` into a store, a file store and the service."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from batchery import backends, doorbells
from batchery.backends import defaults
from batchery.batchapi.message_batches import MAX_REQUESTS, MessageBatchService
from batchery.batchapi.service import BatchService
from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.jobs.service import JobService
from batchery.model import deployments
from batchery.ports.doorbell import Doorbell, Silent
from batchery.security import deployment_policy, secrets, trust
from batchery.settings import Settings
from batchery.stores.sql.store import SqlStore


@dataclass
class Runtime:
    settings: Settings
    store: SqlStore
    files: FsspecFileStore
    service: BatchService
    message_batches: MessageBatchService
    jobs: JobService
    policy: trust.TrustPolicy
    #: Rung by the API when it made work, so that idle workers start on it at once.
    doorbell: Doorbell = dataclasses.field(default_factory=Silent)

    def close(self) -> None:
        self.doorbell.close()
        self.store.close()


def open_runtime(settings: Settings, *, publish_deployments: bool = False) -> Runtime:
    """Open the stores. `publish_deployments` (the server does it) records the configured
    deployments in the database, where every worker reads them."""
    if settings.database_url is None or settings.files_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    policy = load_policy(settings)
    store = SqlStore.from_url(settings.db_url)
    if publish_deployments:
        catalog = (deployments.load(settings.config, check_options=backends.check_options)
                   if settings.config
                   else deployments.Catalog(deployments=defaults.default_deployments()))
        for deployment in catalog.deployments:
            user_code = backends.runs_user_code(deployment.backend)
            deployment_policy.check(deployment, policy, via_api=False, runs_user_code=user_code)
            if not user_code:  # user code loads in workers only
                backends.check(deployment)
        box = secrets.SecretBox.from_env()
        sealed = [dataclasses.replace(d, options=secrets.seal_options(
            d.options, box, f"deployment '{d.name}' options")) for d in catalog.deployments]
        try:  # one owner per declaration: another live server's are not replaced
            for note in store.publish_config(sealed, catalog.endpoints,
                                             settings.server_identity(),
                                             take_over=settings.take_over):
                logging.getLogger("batchery").warning("%s", note)
        except Exception:
            store.close()
            raise
    files = FsspecFileStore(settings.file_store_url)
    return Runtime(settings=settings, store=store, files=files, policy=policy,
                   doorbell=doorbells.for_store(settings.db_url, settings.data_dir),
                   service=BatchService(store, files, chunk_size=settings.chunk_size,
                                        max_tasks=settings.max_tasks),
                   message_batches=MessageBatchService(
                       store, files, chunk_size=settings.chunk_size,
                       max_requests=min(settings.max_tasks, MAX_REQUESTS),
                       window_s=settings.message_batch_window_s),
                   jobs=JobService(store, outputs_url=settings.outputs_url,
                                   stall_after_s=2 * settings.lease_s, policy=policy,
                                   files_url=settings.file_store_url))


def load_policy(settings: Settings) -> trust.TrustPolicy:
    """The operator's trust policy: the config file's `security:` and `projects:` sections,
    the `serve` flags, and whether a keys file makes this server shared."""
    data: Any = None
    if settings.config is not None:
        try:
            data = yaml.safe_load(Path(settings.config).read_text())
        except (OSError, yaml.YAMLError):
            data = None  # `deployments.load` reports a broken config file
    policy = trust.parse_policy(data, str(settings.config))
    protected = [str(settings.data_dir.resolve())]
    if "://" not in settings.file_store_url or settings.file_store_url.startswith("file://"):
        protected.append(str(Path(settings.file_store_url.removeprefix("file://")).resolve()))
    return dataclasses.replace(
        policy, open=settings.keys_file is None,
        allow_code_deployments=policy.allow_code_deployments
        or settings.allow_code_deployments,
        protected_paths=tuple(dict.fromkeys(protected)))
