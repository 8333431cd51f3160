"""The paths and URLs a job names, on a shared server (a keys file, and a config file that
grants each project its input and output roots), tried as an attacker would: a member of
one project reaching for the server's files, another project's data and results, or an
internal host. Also: uploaded files as job inputs (`file_ids`), and files that cannot be
read answered with a 400 naming them, in open mode too."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.acceptance.jobs_support import Jobs, deployment
from tests.conftest import Server, start_server
from tests.helpers import Listener
from tests.s3_server import moto_server, s3_env

pytestmark = pytest.mark.slow

JOBS = "/endpoints/echo/jobs"
#: A ragged CSV, a Parquet file that is not one, an empty CSV, a line that is not JSON.
DEFECTS = {"ragged.csv": b"a,b\n1,2\n1,2,3\n", "fake.parquet": b"a,b\n1,2\n",
           "empty.csv": b"", "broken.jsonl": b'{"ok": 1}\nnot json\n'}


def write_keys(path: Path, projects: list[str]) -> dict[str, str]:
    """A keys file with a member key per project; returns the keys by project."""
    keys = {p: f"sk-{p}-{secrets.token_hex(12)}" for p in projects}
    path.write_text(yaml.safe_dump({"keys": [
        {"name": f"{p}-member", "project": p, "role": "member",
         "sha256": hashlib.sha256(key.encode()).hexdigest()} for p, key in keys.items()]}))
    return keys


def write_config(path: Path, projects: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({
        "endpoints": [{"name": "echo", "deployments": [deployment("v1", "AsyncEcho")]}],
        "projects": projects}))
    return path


def client(server: Server, key: str) -> Jobs:
    jobs = Jobs(server.base_url)
    jobs.http.headers["Authorization"] = f"Bearer {key}"
    return jobs


def upload(server: Server, key: str, name: str, content: bytes) -> str:
    response = httpx.post(server.v1 + "/files", headers={"Authorization": f"Bearer {key}"},
                          data={"purpose": "user_data"},
                          files={"file": (name, content, "application/octet-stream")})
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


def error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    found: dict[str, Any] = response.json()["error"]
    return found


@dataclass
class Site:
    server: Server
    root: Path  #: where the test's directories lie
    a_root: Path  #: team-a's input root
    b_root: Path  #: team-b's input root
    a_out: Path  #: team-a's granted output root
    a: Jobs
    b: Jobs
    keys: dict[str, str]

    @property
    def outputs(self) -> Path:
        return self.server.data_dir / "files" / "outputs"

    def dry_run(self, body: dict[str, Any], jobs: Jobs | None = None) -> httpx.Response:
        return (jobs or self.a).http.post(JOBS, params={"dry_run": "true"}, json=body)

    def both(self, body: dict[str, Any]) -> list[httpx.Response]:
        """A dry run and a real submission of `body` by team-a."""
        answers = [self.dry_run(body), self.a.http.post(JOBS, json=body)]
        for answer in answers:
            if answer.status_code == 200 and answer.json().get("object") == "job":
                self.a.http.delete(f"/jobs/{answer.json()['id']}")
        return answers


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("shared")
    a_root, b_root, a_out = root / "datasets" / "team-a", root / "datasets" / "team-b", \
        root / "out" / "team-a"
    for directory in (a_root / "sub", b_root, root / "datasets" / "team-ab", a_out):
        directory.mkdir(parents=True)
    (a_root / "a.csv").write_text("x,y\n1,2\n3,4\n")
    (a_root / "sub" / "b.jsonl").write_text('{"x": 5}\n')
    (b_root / "b-secret.csv").write_text("value\nb-private-4242\n")
    (root / "datasets" / "team-ab" / "ab-secret.csv").write_text("value\nab-private-4343\n")
    keys = write_keys(root / "keys.yaml", ["team-a", "team-b"])
    config = write_config(root / "config.yaml", {
        "team-a": {"input_roots": [str(a_root), "s3://corp-data/team-a/"],
                   "output_roots": [str(a_out)]},
        "team-b": {"input_roots": [str(b_root)]}})
    server = start_server(root, "--config", str(config), "--keys-file",
                          str(root / "keys.yaml"), "--workers", "1", name="shared")
    a, b = client(server, keys["team-a"]), client(server, keys["team-b"])
    yield Site(server=server, root=root, a_root=a_root, b_root=b_root, a_out=a_out, a=a, b=b,
               keys=keys)
    a.http.close()
    b.http.close()
    server.stop()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


# -- reading ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/root", "/", "/etc", "/etc/passwd", "~", "relative"])
@pytest.mark.parametrize("kind", ["file_path_lister", "delimited_files"])
def test_paths_outside_the_project_roots_are_refused(site: Site, path: str,
                                                     kind: str) -> None:
    for answer in site.both({kind: {"paths": [path], "batch_size": 1}}):
        found = error(answer)
        assert found["param"] == f"{kind}.paths"
        assert path in found["message"] and str(site.a_root) in found["message"]
        assert "outside the input roots of project 'team-a'" in found["message"]


def test_climbing_or_linking_out_of_a_root_is_refused(site: Site) -> None:
    links = site.a_root / "links"
    links.mkdir(exist_ok=True)
    if not (links / "b.csv").exists():
        (links / "b.csv").symlink_to(site.b_root / "b-secret.csv")
        (links / "dir").symlink_to(site.b_root)
    for path in (f"{site.a_root}/../team-b/b-secret.csv", f"{site.a_root}/../team-b",
                 str(site.root / "datasets" / "team-ab"), f"{site.a_root}/../team-ab",
                 str(links / "b.csv"), str(links / "dir"), str(links / "dir" / "*.csv"),
                 f"{site.a_root}/*/../../team-b/*.csv", str(site.root / "datasets" / "*")):
        for answer in site.both({"delimited_files": {"paths": [path], "batch_size": 1}}):
            assert error(answer)["param"] == "delimited_files.paths", path
            assert "private" not in answer.text
    # A listing inside the root that meets a link leading out: refused, naming the link.
    for answer in site.both({"file_path_lister": {"paths": [str(links)], "batch_size": 1}}):
        assert "leads outside the input roots" in error(answer)["message"]
        assert "b-secret" not in answer.text and "private" not in answer.text
    # The rest of the root stays readable.
    dry = site.dry_run({"delimited_files": {"paths": [str(site.a_root)],
                                            "excludes": ["links/**"], "batch_size": 2}})
    assert dry.status_code == 200, dry.text
    assert dry.json()["files"] == [str(site.a_root / "a.csv"),
                                   str(site.a_root / "sub" / "b.jsonl")]
    assert dry.json()["total_items"] == 3


@pytest.mark.parametrize("scheme", ["webhdfs", "ftp", "http", "https", "memory", "gcs"])
def test_urls_of_schemes_no_root_uses_are_refused_before_any_connection(
        site: Site, listener: Listener, scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{listener.port}/data.jsonl"
    for kind in ("file_path_lister", "delimited_files"):
        for answer in site.both({kind: {"paths": [url], "batch_size": 1}}):
            found = error(answer)
            assert found["param"] == f"{kind}.paths" and url in found["message"]
            assert "s3://corp-data/team-a/" in found["message"]  # the roots it has
    chained = f"{site.a_root}/a.zip::http://127.0.0.1:{listener.port}/x"
    for answer in site.both({"delimited_files": {"paths": [chained], "batch_size": 1}}):
        assert "chains file systems" in error(answer)["message"]
    assert listener.connections == 0


def test_object_store_urls_outside_the_granted_prefix_are_refused(site: Site) -> None:
    for url in ("s3://corp-data/team-b/x.csv", "s3://corp-data/team-ab/x.csv",
                "s3://corp-data/team-a/../team-b/x.csv", "s3://corp-data/", "s3://other/x"):
        for answer in site.both({"delimited_files": {"paths": [url], "batch_size": 1}}):
            assert "outside the input roots" in error(answer)["message"], url


def test_another_projects_results_cannot_be_read(site: Site) -> None:
    job = site.b.submit("echo", {"item_list": {"items": ["b-private"], "batch_size": 1}})
    done = site.b.wait(job["id"])
    assert done["status"] == "succeeded", site.b.logs(job["id"])
    results = Path(done["output_path"]) / "results.jsonl"
    assert done["output_path"] == str(site.outputs / "team-b" / job["id"])
    assert "b-private" in results.read_text()
    for path in (str(results), done["output_path"], str(site.outputs),
                 f"{site.a_root}/../../{results.relative_to(site.root)}",
                 str(site.server.data_dir)):
        for kind in ("delimited_files", "file_path_lister"):
            for answer in site.both({kind: {"paths": [path], "batch_size": 1}}):
                assert error(answer)["param"] == f"{kind}.paths", path
                assert "b-private" not in answer.text
    # Nor through a link placed in the project's own root.
    link = site.a_root / "their-results.jsonl"
    if not link.exists():
        link.symlink_to(results)
    for answer in site.both({"delimited_files": {"paths": [str(link)], "batch_size": 1}}):
        assert error(answer)["param"] == "delimited_files.paths"
    link.unlink()


# -- writing ---------------------------------------------------------------------------

def test_output_path_must_be_under_the_projects_own_or_granted_roots(site: Site) -> None:
    item = {"item_list": {"items": [1], "batch_size": 1}}
    evil = Path(f"/tmp/evil-{site.root.name}")
    for target in (str(evil), "../x", f"{site.outputs}/team-a/../team-b/x",
                   str(site.outputs / "team-b"), str(site.outputs), str(site.a_root),
                   f"{site.a_out}/../elsewhere", str(site.server.data_dir),
                   "s3://corp-data/team-a/out", "memory://x"):
        answer = site.a.http.post(JOBS, json={**item, "output_path": target})
        found = error(answer)
        assert found["param"] == "output_path" and target in found["message"], target
    assert not evil.exists()
    # Without output_path: the project's own root; with one, a granted root.
    default = site.a.submit("echo", item)
    assert default["output_path"] == str(site.outputs / "team-a" / default["id"])
    chosen = site.a.submit("echo", {**item, "output_path": f"{site.a_out}/x/../runs"})
    assert chosen["output_path"] == str(site.a_out / "runs" / chosen["id"])
    for job in (default, chosen):
        assert site.a.wait(job["id"])["status"] == "succeeded", site.a.logs(job["id"])
    assert (site.a_out / "runs" / chosen["id"] / "results.jsonl").is_file()


# -- uploaded files ----------------------------------------------------------------------

def test_uploaded_files_are_job_inputs_by_id(site: Site) -> None:
    csv_id = upload(site.server, site.keys["team-a"], "table.csv", b"x,y\n1,2\n3,4\n")
    ndjson_id = upload(site.server, site.keys["team-a"], "more.jsonl", b'{"x": 5}\n')
    body = {"delimited_files": {"paths": [str(site.a_root / "sub")],
                                "file_ids": [csv_id, ndjson_id, csv_id], "batch_size": 2}}
    dry = site.dry_run(body)
    assert dry.status_code == 200, dry.text
    assert dry.json()["files"] == [str(site.a_root / "sub" / "b.jsonl"), csv_id, ndjson_id]
    assert dry.json()["total_items"] == 4
    job = site.a.submit("echo", body)
    assert job["input"]["delimited_files"]["file_ids"] == [csv_id, ndjson_id]
    done = site.a.wait(job["id"])
    assert done["status"] == "succeeded", site.a.logs(job["id"])
    rows = sorted(site.a.results(job["id"]), key=lambda r: r["index"])
    assert [r["item"] for r in rows] == [{"x": 5}, {"x": 1, "y": 2}, {"x": 3, "y": 4},
                                         {"x": 5}]
    # file_path_lister hands the predictor a path it can open.
    listed = site.a.submit("echo", {"file_path_lister": {"file_ids": [csv_id],
                                                         "batch_size": 1}})
    assert site.a.wait(listed["id"])["status"] == "succeeded"
    (row,) = site.a.results(listed["id"])
    assert Path(row["item"]).read_bytes() == b"x,y\n1,2\n3,4\n"


def test_another_projects_file_id_is_as_unknown_as_a_missing_one(site: Site) -> None:
    theirs = upload(site.server, site.keys["team-b"], "theirs.csv", b"value\nb-private\n")
    missing = "file-" + "0" * 24
    for kind in ("delimited_files", "file_path_lister"):
        answers = []
        for file_id in (theirs, missing):
            for answer in site.both({kind: {"file_ids": [file_id], "batch_size": 1}}):
                found = error(answer)
                assert found["param"] == f"{kind}.file_ids"
                answers.append((answer.status_code, found["message"].replace(file_id, "<id>")))
        assert len(set(answers)) == 1, answers
    # Its owner reads it.
    dry = site.dry_run({"delimited_files": {"file_ids": [theirs], "batch_size": 1}}, site.b)
    assert dry.status_code == 200 and dry.json()["total_items"] == 1, dry.text


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_unreadable_files_are_a_400_naming_them(site: Site, name: str) -> None:
    (site.a_root / "defects").mkdir(exist_ok=True)
    (site.a_root / "defects" / name).write_bytes(DEFECTS[name])
    path = str(site.a_root / "defects" / name)
    found = error(site.dry_run({"delimited_files": {"paths": [path], "batch_size": 1}}))
    assert path in found["message"] and found["param"] == "delimited_files.paths"
    file_id = upload(site.server, site.keys["team-a"], name, DEFECTS[name])
    found = error(site.dry_run({"delimited_files": {"file_ids": [file_id], "batch_size": 1}}))
    assert f"{file_id} ({name})" in found["message"]
    assert found["param"] == "delimited_files.file_ids"


def test_an_uploaded_file_of_an_unknown_format_is_refused(site: Site) -> None:
    file_id = upload(site.server, site.keys["team-a"], "notes.txt", b"hello")
    found = error(site.dry_run({"delimited_files": {"file_ids": [file_id], "batch_size": 1}}))
    assert f"{file_id} (notes.txt)" in found["message"] and "supported" in found["message"]


# -- open mode and object stores -----------------------------------------------------------

def test_open_mode_answers_unreadable_files_with_a_400(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", {})
    server = start_server(tmp_path, "--config", str(config), "--workers", "0", name="open")
    jobs = Jobs(server.base_url)
    try:
        for name, body in DEFECTS.items():
            (tmp_path / name).write_bytes(body)
            answer = jobs.http.post(JOBS, params={"dry_run": "true"}, json={
                "delimited_files": {"paths": [str(tmp_path / name)], "batch_size": 1}})
            assert str(tmp_path / name) in error(answer)["message"]
        # Open mode reads any local path, and writes where it is told, as always.
        dry = jobs.http.post(JOBS, params={"dry_run": "true"}, json={
            "file_path_lister": {"paths": [str(tmp_path / "ragged.csv")], "batch_size": 1},
            "output_path": str(tmp_path / "anywhere")})
        assert dry.status_code == 200 and dry.json()["total_items"] == 1, dry.text
        job = jobs.submit("echo", {"item_list": {"items": [1], "batch_size": 1}})
        assert job["output_path"] == str(server.data_dir.resolve() / "files" / "outputs" /
                                         job["id"])
    finally:
        jobs.http.close()
        server.stop()


def test_object_store_roots_are_prefixes_of_one_bucket(tmp_path: Path) -> None:
    import boto3

    with moto_server() as endpoint:
        env = s3_env(endpoint)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="data")
        for key, content in {"team-a/in/a.csv": b"x\n1\n2\n",
                             "team-ab/secret.csv": b"s\n9\n",
                             "team-b/secret.csv": b"s\n8\n"}.items():
            s3.put_object(Bucket="data", Key=key, Body=content)
        keys = write_keys(tmp_path / "keys.yaml", ["team-a"])
        config = write_config(tmp_path / "config.yaml", {"team-a": {
            "input_roots": ["s3://data/team-a/"], "output_roots": ["s3://data/out-a/"]}})
        server = start_server(tmp_path, "--config", str(config), "--keys-file",
                              str(tmp_path / "keys.yaml"), "--workers", "1",
                              env={**os.environ, **env}, name="s3")
        jobs = client(server, keys["team-a"])
        try:
            body: dict[str, Any] = {"delimited_files": {"paths": ["s3://data/team-a/in/../"],
                                                        "batch_size": 1}}
            dry = jobs.http.post(JOBS, params={"dry_run": "true"}, json=body)
            assert dry.status_code == 200, dry.text
            assert dry.json()["files"] == ["s3://data/team-a/in/a.csv"]
            for url in ("s3://data/team-ab/", "s3://data/team-a/../team-b/", "s3://data/"):
                answer = jobs.http.post(JOBS, params={"dry_run": "true"}, json={
                    "delimited_files": {"paths": [url], "batch_size": 1}})
                assert "outside the input roots" in error(answer)["message"], url
            answer = jobs.http.post(JOBS, json={**body, "output_path": "s3://data/out-b/"})
            assert error(answer)["param"] == "output_path"
            job = jobs.submit("echo", {**body, "output_path": "s3://data/out-a/"})
            done = jobs.wait(job["id"])
            assert done["status"] == "succeeded", jobs.logs(job["id"])
            stored = s3.get_object(Bucket="data", Key=f"out-a/{job['id']}/results.jsonl")
            assert len(io.BytesIO(stored["Body"].read()).readlines()) == 2
        finally:
            s3.close()
            jobs.http.close()
            server.stop()
