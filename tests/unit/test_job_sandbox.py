"""The sandbox of a shared server's jobs: which paths and URLs a project's jobs may read
and where they may write, checked on the text (and the real local path) before anything
is listed or opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchery.jobs import inputs
from batchery.jobs.sandbox import Sandbox, place
from batchery.model.exceptions import InvalidRequest
from batchery.security.trust import ProjectGrant, TrustPolicy

PARAM = "file_path_lister.paths"


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """Two projects' datasets, a sibling whose name extends one of them, the server's data
    directory (with its file store and outputs), and something outside everything."""
    for name in ("datasets/team-a/sub/a.csv", "datasets/team-a/b.csv",
                 "datasets/team-ab/secret.csv", "datasets/team-b/b.csv",
                 "data/files/outputs/team-b/job_1/results.jsonl",
                 "data/files/files/file-x", "outside/secret.csv"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n1\n")
    return tmp_path


def sandbox(root: Path, *, open_mode: bool = False, project: str = "team-a",
            input_roots: tuple[str, ...] | None = None,
            output_roots: tuple[str, ...] = ()) -> Sandbox:
    roots = input_roots if input_roots is not None else (
        str(root / "datasets" / "team-a"), "s3://corp-data/team-a/")
    policy = TrustPolicy(open=open_mode, projects={
        "team-a": ProjectGrant(input_roots=roots, output_roots=output_roots),
        "team-b": ProjectGrant(input_roots=(str(root / "datasets" / "team-b"),))},
        protected_paths=(str(root / "data"),))
    files = root / "data" / "files"
    return Sandbox(policy, project, outputs_url=str(files / "outputs"), files_url=str(files))


def refused(box: Sandbox, path: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        box.input_path(path, PARAM)
    assert caught.value.param == PARAM
    assert path in caught.value.message
    return caught.value.message


def test_open_mode_lets_every_path_through(layout: Path) -> None:
    box = sandbox(layout, open_mode=True)
    for path in ("/", "/etc/passwd", "http://127.0.0.1:1/x", "a::b", str(layout / "data")):
        assert box.input_path(path, PARAM) == path
    assert box.may_list("/etc")
    box.check_found("/etc/passwd", PARAM)
    assert box.output_base(None) == str(layout / "data" / "files" / "outputs")
    assert box.output_base("/tmp/anywhere") == "/tmp/anywhere"


def test_local_paths_inside_a_root_are_allowed(layout: Path) -> None:
    box = sandbox(layout)
    root = layout / "datasets" / "team-a"
    for path in (str(root), f"{root}/", str(root / "sub" / "a.csv"), f"file://{root}/b.csv",
                 str(root / "sub" / ".." / "b.csv"), str(root / "**" / "*.csv"),
                 str(root / "img"), str(root / "sub" / "[ab].csv")):
        assert box.input_path(path, PARAM) == path


@pytest.mark.parametrize("path", [
    "/", "/etc", "/etc/passwd", "/root", "~/.ssh/id_rsa", "relative/path.csv", "file:///etc/passwd",
])
def test_places_outside_every_root_are_refused(layout: Path, path: str) -> None:
    message = refused(sandbox(layout), path)
    assert "outside the input roots of project 'team-a'" in message
    assert str(layout / "datasets" / "team-a") in message  # which roots it has


def test_a_root_grants_its_own_tree_only(layout: Path) -> None:
    box = sandbox(layout)
    datasets = layout / "datasets"
    refused(box, str(datasets / "team-ab" / "secret.csv"))  # not a string prefix
    refused(box, str(datasets / "team-ab"))
    refused(box, str(datasets / "team-a" / ".." / "team-b" / "b.csv"))
    refused(box, str(datasets / "team-a" / ".." / ".." / "outside"))
    refused(box, str(datasets / "team-b"))  # another project's root
    refused(box, str(datasets))


def test_a_symbolic_link_out_of_a_root_is_refused(layout: Path) -> None:
    root = layout / "datasets" / "team-a"
    (root / "escape").symlink_to(layout / "outside")
    (root / "file.csv").symlink_to(layout / "outside" / "secret.csv")
    box = sandbox(layout)
    refused(box, str(root / "escape"))
    refused(box, str(root / "escape" / "secret.csv"))
    refused(box, str(root / "file.csv"))
    refused(box, str(root / "escape" / "*.csv"))  # the glob's base resolves outside
    # A root that is itself a link: what counts is where it leads.
    (layout / "link-to-a").symlink_to(root)
    linked = sandbox(layout, input_roots=(str(layout / "link-to-a"),))
    assert linked.input_path(str(root / "b.csv"), PARAM) == str(root / "b.csv")


def test_globs_are_checked_on_their_base_and_may_not_climb(layout: Path) -> None:
    box = sandbox(layout)
    root = layout / "datasets" / "team-a"
    refused(box, str(layout / "datasets" / "*" / "b.csv"))
    refused(box, str(layout / "*"))
    refused(box, "/*")
    message = refused(box, f"{root}/*/../../team-b/*.csv")
    assert "'..' after a glob character" in message


def test_every_file_a_listing_finds_is_checked(layout: Path) -> None:
    root = layout / "datasets" / "team-a"
    (root / "sub" / "leak.csv").symlink_to(layout / "outside" / "secret.csv")
    (root / "dir-link").symlink_to(layout / "outside")
    box = sandbox(layout)
    select = inputs.FileSelection
    assert inputs.list_files(select(paths=(str(root),), includes=("b.csv",)),
                             param="p", guard=box) == [str(root / "b.csv")]
    for path, found in ((str(root), "dir-link"), (str(root / "sub"), "sub/leak.csv"),
                        (str(root / "sub" / "*.csv"), "sub/leak.csv"),
                        (str(root / "sub" / "le"), "sub/leak.csv")):
        box.input_path(path, PARAM)  # the path itself is inside the root
        with pytest.raises(InvalidRequest, match="leads outside the input roots") as caught:
            inputs.list_files(select(paths=(path,)), param="p", guard=box)
        assert str(root / found) in caught.value.message
        assert caught.value.param == "p.paths"
    # Without the sandbox (open mode) the same listing reads through the link.
    assert str(root / "sub" / "leak.csv") in inputs.list_files(
        select(paths=(str(root / "sub"),)), param="p", guard=sandbox(layout, open_mode=True))


def test_a_listing_never_looks_above_a_root(layout: Path) -> None:
    # A root that does not exist is read as a prefix of its parent's entries: the
    # parent (which holds team-ab) is outside the root, so nothing is listed.
    box = sandbox(layout, input_roots=(str(layout / "datasets" / "team-a"),))
    missing = sandbox(layout, input_roots=(str(layout / "datasets" / "team"),))
    assert box.may_list(str(layout / "datasets" / "team-a" / "sub"))
    assert not box.may_list(str(layout / "datasets"))
    path = str(layout / "datasets" / "team")
    assert missing.input_path(path, PARAM) == path
    with pytest.raises(InvalidRequest, match="No file matched"):
        inputs.list_files(inputs.FileSelection(paths=(path,)), param="p", guard=missing)


def test_the_servers_own_data_is_never_readable(layout: Path) -> None:
    # Even when the operator grants a root that covers the data directory.
    box = sandbox(layout, input_roots=(str(layout),))
    assert box.input_path(str(layout / "outside" / "secret.csv"), PARAM)
    refused(box, str(layout / "data" / "files" / "outputs" / "team-b" / "job_1"))
    refused(box, str(layout / "data" / "files" / "files" / "file-x"))
    refused(box, str(layout / "data"))
    assert not box.may_list(str(layout / "data" / "files"))


def test_object_store_paths_sit_under_a_root_prefix(layout: Path) -> None:
    box = sandbox(layout)
    assert box.input_path("s3://corp-data/team-a/x/*.csv", PARAM) == \
        "s3://corp-data/team-a/x/*.csv"
    assert box.input_path("s3://corp-data/team-a/", PARAM) == "s3://corp-data/team-a/"
    # `..` that stays inside is normalised away: an object store takes it literally.
    assert box.input_path("s3://corp-data/team-a/x/../y.csv", PARAM) == \
        "s3://corp-data/team-a/y.csv"
    for path in ("s3://corp-data/team-ab/x.csv", "s3://corp-data/team-a/../team-b/x.csv",
                 "s3://corp-data/team-a/../../x", "s3://corp-data/", "s3://other/team-a/x",
                 "s3:///corp-data/team-a/x", "s3://corp-data/team-a/*/../../team-b/x"):
        assert "outside the input roots" in refused(box, path)


@pytest.mark.parametrize("path", [
    "webhdfs://namenode:9870/user/x", "ftp://127.0.0.1/x", "http://127.0.0.1:8080/x",
    "https://example.com/data.csv", "memory://x", "gcs://corp-data/team-a/x",
    "data:text/plain,hello",
])
def test_schemes_no_root_uses_are_refused(layout: Path, path: str) -> None:
    message = refused(sandbox(layout), path)
    assert "none of the input roots of project 'team-a' uses" in message
    assert "s3://corp-data/team-a/" in message


def test_chained_file_systems_are_refused(layout: Path) -> None:
    root = layout / "datasets" / "team-a"
    for path in (f"{root}/x.zip::http://127.0.0.1:1/x", "simplecache::s3://corp-data/team-a/x",
                 "zip://a.csv::s3://corp-data/team-a/x.zip"):
        assert "chains file systems" in refused(sandbox(layout), path)


def test_a_project_without_roots_is_told_to_upload(layout: Path) -> None:
    box = sandbox(layout, project="team-c")
    message = refused(box, str(layout / "datasets" / "team-a"))
    assert "no input roots" in message and "file_ids" in message


def test_outputs_go_under_the_projects_own_root_or_a_granted_one(layout: Path) -> None:
    outputs = layout / "data" / "files" / "outputs"
    out = layout / "out" / "team-a"
    out.mkdir(parents=True)
    box = sandbox(layout, output_roots=(str(out), "s3://corp-out/team-a/"))
    assert box.output_base(None) == str(outputs / "team-a")
    assert box.output_base(str(outputs / "team-a" / "mine")) == str(outputs / "team-a" / "mine")
    assert box.output_base(str(out / "x" / ".." / "y")) == str(out / "y")
    assert box.output_base("s3://corp-out/team-a/runs/") == "s3://corp-out/team-a/runs"
    (out / "escape").symlink_to(layout / "outside")
    for path in ("/tmp/x", str(outputs / "team-b"), str(outputs / "team-a" / ".." / "team-b"),
                 str(outputs), f"{out}/../team-b", str(out / "escape" / "x"),
                 "s3://corp-out/team-b/", "s3://corp-out/team-a/../team-b", "memory://x",
                 f"{out}::memory://x"):
        with pytest.raises(InvalidRequest) as caught:
            box.output_base(path)
        assert caught.value.param == "output_path"
        assert path in caught.value.message


def test_a_granted_output_root_never_reaches_into_the_servers_data(layout: Path) -> None:
    box = sandbox(layout, output_roots=(str(layout),))
    assert box.output_base(str(layout / "out")) == str(layout / "out")
    with pytest.raises(InvalidRequest):
        box.output_base(str(layout / "data" / "files" / "outputs" / "team-b"))


def test_places_compare_at_path_boundaries() -> None:
    assert place("/data/a/x").within(place("/data/a"))
    assert not place("/data/ab").within(place("/data/a"))
    assert place("s3://b/p/q").within(place("s3://b/p/"))
    assert not place("s3://b/pq").within(place("s3://b/p"))
    assert not place("s3://b/p/q").within(place("gs://b/p"))
    assert place("s3://b/../b/p").within(place("s3://b"))  # climbs, then comes back
    assert not place("s3://b/../c/p").within(place("s3://b"))
    assert not place("s3://b/../../b/p").within(place("s3://"))
    assert place("file:///data/a/x").within(place("/data/a"))
