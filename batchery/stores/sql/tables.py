"""The schema, in one place. Migrations in `migrations/versions` must produce exactly this."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

files = sa.Table(
    "files", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("storage_key", sa.String(512), nullable=False),
    sa.Index("ix_files_project_seq", "project", "seq"),
)

batches = sa.Table(
    "batches", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("input_key", sa.String(512), nullable=True),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("chunk_size", sa.Integer, nullable=False, server_default="1000"),
    sa.Column("max_tasks", sa.BigInteger, nullable=False, server_default="10000000"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("end_reason", sa.String(16), nullable=True),
    sa.Column("model", sa.String(256), nullable=True),
    sa.Column("errors", sa.JSON, nullable=True),
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Column("output_file_id", sa.String(64), nullable=True),
    sa.Column("error_file_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("in_progress_at", sa.BigInteger, nullable=True),
    sa.Column("finalizing_at", sa.BigInteger, nullable=True),
    sa.Column("completed_at", sa.BigInteger, nullable=True),
    sa.Column("failed_at", sa.BigInteger, nullable=True),
    sa.Column("expired_at", sa.BigInteger, nullable=True),
    sa.Column("cancelling_at", sa.BigInteger, nullable=True),
    sa.Column("cancelled_at", sa.BigInteger, nullable=True),
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("unrun", sa.Integer, nullable=False, server_default="0"),
    sa.Column("remote", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("webhook_url", sa.String(2048), nullable=True),
    sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_token", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("phase_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("phase_error", sa.Text, nullable=True),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("paused_at", sa.BigInteger, nullable=True),
    sa.Column("retry_of", sa.String(64), nullable=True),
    sa.Column("max_cost", sa.Float, nullable=True),
    sa.Column("max_total_tokens", sa.BigInteger, nullable=True),
    sa.Column("cost", sa.Float, nullable=False, server_default="0"),
    sa.Column("warnings", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reasoning_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("ix_batches_project_seq", "project", "seq"),
    sa.Index("ix_batches_status", "status"),
)

chunks = sa.Table(
    "chunks", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("start_offset", sa.BigInteger, nullable=False),
    sa.Column("end_offset", sa.BigInteger, nullable=False),
    sa.Column("first_line", sa.Integer, nullable=False),
    sa.Column("n_lines", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("not_before", sa.Float, nullable=True),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_token", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("n_ok", sa.Integer, nullable=False, server_default="0"),
    sa.Column("n_err", sa.Integer, nullable=False, server_default="0"),
    sa.Column("out_key", sa.String(512), nullable=True),
    sa.Column("err_key", sa.String(512), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("expiries", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("batch_id", "idx", name="uq_chunks_batch_idx"),
    sa.Index("ix_chunks_state_id", "state", "id"),
)

#: The lines of a chunk committed while it runs: a part file each for answers and errors,
#: with the byte offsets (in the batch's input) of the lines they answer.
chunk_parts = sa.Table(
    "chunk_parts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("chunk_id", sa.Integer, nullable=False),
    sa.Column("lo", sa.BigInteger, nullable=False),
    sa.Column("hi", sa.BigInteger, nullable=False),
    sa.Column("offsets", sa.JSON, nullable=False),
    sa.Column("n_ok", sa.Integer, nullable=False),
    sa.Column("n_err", sa.Integer, nullable=False),
    sa.Column("out_key", sa.String(512), nullable=True),
    sa.Column("err_key", sa.String(512), nullable=True),
    sa.Index("ix_chunk_parts_batch_lo", "batch_id", "lo"),
)

deployments = sa.Table(
    "deployments", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("backend", sa.String(64), nullable=False),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=True),
    sa.Column("workers", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("source", sa.String(16), nullable=False, server_default="config"),
    sa.Column("project", sa.String(128), nullable=True),
    sa.Column("projects", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("prices", sa.JSON(none_as_null=True), nullable=True),
)

workers = sa.Table(
    "workers", metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_heartbeat", sa.Float, nullable=False),
    sa.Column("current", sa.String(128), nullable=True),
    sa.Column("chunks_done", sa.Integer, nullable=False, server_default="0"),
    #: The models the worker loaded when it started: name -> seconds, and name -> why not.
    sa.Column("load_s", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("load_errors", sa.JSON(none_as_null=True), nullable=True),
)

#: The `batchery serve` processes that publish a config file: one row per server identity.
servers = sa.Table(
    "servers", metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("config", sa.String(1024), nullable=True),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("stopped_at", sa.Float, nullable=True),
)

#: Which server declared each deployment (`kind` 'deployment') and endpoint ('endpoint')
#: of a config file, with a digest of the declaration.
config_owners = sa.Table(
    "config_owners", metadata,
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("server_id", sa.String(128), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
)

# -- the native job API ------------------------------------------------------------------

endpoints = sa.Table(
    "endpoints", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("default_deployment", sa.String(64), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    #: The owning project of one made over the API; the config file's allow-list.
    sa.Column("project", sa.String(128), nullable=True),
    sa.Column("projects", sa.JSON(none_as_null=True), nullable=True),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("deployment", sa.String(64), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("input", sa.JSON, nullable=False),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("output_path", sa.String(1024), nullable=False),
    sa.Column("total_batch_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("total_items", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("items_succeeded", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("items_failed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("batches_succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("dead_letters", sa.Integer, nullable=False, server_default="0"),
    sa.Column("batch_time_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("enqueue_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("ended_at", sa.Float, nullable=True),
    sa.Column("deadline", sa.Float, nullable=True),
    sa.Column("results_url", sa.String(1024), nullable=True),
    sa.Column("webhook_url", sa.String(2048), nullable=True),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_token", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("phase_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("phase_error", sa.Text, nullable=True),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("paused_at", sa.Float, nullable=True),
    sa.Column("retry_of", sa.String(64), nullable=True),
    sa.Column("warnings", sa.JSON(none_as_null=True), nullable=True),
    sa.Index("ix_jobs_project_seq", "project", "seq"),
    sa.Index("ix_jobs_stage", "stage"),
)

job_batches = sa.Table(
    "job_batches", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("segment_key", sa.String(512), nullable=False),
    sa.Column("start_offset", sa.BigInteger, nullable=False),
    sa.Column("end_offset", sa.BigInteger, nullable=False),
    sa.Column("first_item", sa.BigInteger, nullable=False),
    sa.Column("n_items", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("not_before", sa.Float, nullable=True),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_token", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("duration_s", sa.Float, nullable=True),
    sa.Column("out_key", sa.String(512), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("expiries", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("job_id", "idx", name="uq_job_batches_job_idx"),
    sa.Index("ix_job_batches_state_id", "state", "id"),
)

job_workers = sa.Table(
    "job_workers", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("worker_id", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("current_batch", sa.Integer, nullable=True),
    sa.Column("batches_done", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_heartbeat", sa.Float, nullable=False),
)

job_logs = sa.Table(
    "job_logs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("source", sa.String(128), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Index("ix_job_logs_job_id", "job_id", "id"),
    sa.Index("ix_job_logs_job_ts", "job_id", "ts", "id"),
)

# -- webhooks ------------------------------------------------------------------------------

webhook_endpoints = sa.Table(
    "webhook_endpoints", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("event_types", sa.JSON, nullable=False),
    #: A `whsec_…` string, or `{"$sealed": …}` when BATCHERY_SECRET_KEY is set.
    sa.Column("secret", sa.JSON, nullable=False),
    sa.Column("previous_secret", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("previous_expires_at", sa.BigInteger, nullable=True),
    sa.Column("status", sa.String(16), nullable=False, server_default="enabled"),
    sa.Column("disabled_reason", sa.Text, nullable=True),
    sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Index("ix_webhook_endpoints_project_seq", "project", "seq"),
)

#: The outbox: one row per event, written in the transaction of the change that causes it.
webhook_events = sa.Table(
    "webhook_events", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    #: The exact JSON every attempt sends and signs.
    sa.Column("body", sa.Text, nullable=False),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("project", sa.String(128), nullable=False),
    #: NULL for a per-object callback (`webhook_url` at create).
    sa.Column("endpoint_id", sa.String(64), nullable=True),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("test", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=True),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_token", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("last_status_code", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("delivered_at", sa.Float, nullable=True),
    sa.Index("ix_webhook_deliveries_status_due", "status", "next_attempt_at"),
    sa.Index("ix_webhook_deliveries_endpoint_event", "endpoint_id", "event_id"),
)

webhook_attempts = sa.Table(
    "webhook_attempts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("delivery_id", sa.Integer, nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("endpoint_id", sa.String(64), nullable=True),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("success", sa.Boolean, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("latency_ms", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Index("ix_webhook_attempts_endpoint_id", "endpoint_id", "id"),
)

#: Secrets the server makes once and keeps (the webhook server secret when
#: BATCHERY_SECRET_KEY is not set).
server_secrets = sa.Table(
    "server_secrets", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


#: Idempotent creates: a caller's key, within a project and a kind of object (`batch`,
#: `message_batch`, `job`), names the object it created and a fingerprint of the request.
idempotency_keys = sa.Table(
    "idempotency_keys", metadata,
    sa.Column("project", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("key", sa.String(256), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("object_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_idempotency_keys_created_at", "created_at"),
)
