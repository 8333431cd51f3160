"""Where a project's jobs may read and write on a shared server (one with a keys file).

A job reads its project's uploaded files (by id) and what lies under the input roots
the operator granted its project; it writes under its project's output root in the
file store, or under a granted output root. Every path is checked on its text, and for
local paths on the real path the OS resolves (`..`, symbolic links), **before** anything
is listed, opened or connected to; then every file a listing finds is checked again.

In open mode (no keys file) the sandbox lets everything through, as before it existed.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from batchery.jobs.inputs import LOCAL_PROTOCOLS, glob_base
from batchery.model.exceptions import InvalidRequest
from batchery.security.trust import TrustPolicy


@dataclass(frozen=True, slots=True)
class Place:
    """A path or URL reduced to what it names: a real local path (scheme None), or a
    scheme and a normalised path after `scheme://`."""

    scheme: str | None
    path: str

    def within(self, root: Place) -> bool:
        if self.scheme != root.scheme:
            return False
        if self.scheme is None:
            return os.path.commonpath([self.path, root.path]) == root.path
        if _climbs(self.path):
            return False
        # At a `/` boundary: s3://b/team-a grants s3://b/team-a/x, not s3://b/team-ab.
        return not root.path or self.path == root.path \
            or self.path.startswith(root.path + "/")

    def url(self) -> str:
        return self.path if self.scheme is None else f"{self.scheme}://{self.path}"


def _climbs(path: str) -> bool:
    return path == ".." or path.startswith(("../", "/"))


def place(url: str) -> Place:
    protocol, rest = fsspec.core.split_protocol(url)
    if protocol is None or protocol in LOCAL_PROTOCOLS:
        # As fsspec reads it (`~`, relative paths), then as the OS resolves it.
        local = LocalFileSystem._strip_protocol(url)
        return Place(None, os.path.realpath(local))
    normal = posixpath.normpath(rest) if rest else ""
    # A remote path stays remote: `normpath` keeps a leading `/`, which `_climbs` refuses.
    return Place(protocol, "" if normal == "." else normal)


class Sandbox:
    """The places one project's jobs may read and write."""

    def __init__(self, policy: TrustPolicy, project: str, *, outputs_url: str,
                 files_url: str) -> None:
        self.open = policy.open
        self.project = project
        grant = policy.grant(project)
        self.input_roots = grant.input_roots
        self.output_roots = grant.output_roots
        outputs = outputs_url.rstrip("/")
        #: Where the project's jobs write when they name no `output_path`.
        self.output_root = outputs if self.open else f"{outputs}/{project}"
        # The server's own data (the database, every project's files and outputs) is
        # never a granted root, whatever the operator's roots cover.
        self.protected = (*policy.protected_paths, files_url, outputs_url)

    # -- inputs ------------------------------------------------------------------------

    def input_path(self, path: str, param: str) -> str:
        """`path` as the job lists it, once allowed; a 400 naming it when not."""
        if self.open:
            return path
        _no_chain(path, param)
        protocol, _ = fsspec.core.split_protocol(path)
        if protocol is not None and protocol not in LOCAL_PROTOCOLS:
            return self._remote_input(path, protocol, param)
        # As fsspec will read it: `~` and relative paths made absolute.
        local = LocalFileSystem._strip_protocol(path)
        globbed = glob_base(local)
        if globbed is not None:
            # The part holding glob characters is matched, not resolved: no `..` there.
            if ".." in globbed[1].split("/"):
                raise InvalidRequest(f"'{path}' has '..' after a glob character; give the "
                                     f"directory without it.", param=param)
            local = globbed[0] or "/"
        if not self._readable(place(local)):
            raise self._outside(path, param)
        return path

    def input_paths(self, paths: tuple[str, ...], param: str) -> tuple[str, ...]:
        return tuple(self.input_path(path, param) for path in paths)

    def _remote_input(self, path: str, protocol: str, param: str) -> str:
        schemes = {place(root).scheme for root in self.input_roots}
        if protocol not in schemes:
            raise InvalidRequest(f"'{path}' uses the scheme '{protocol}://', which none of "
                                 f"the input roots of project '{self.project}' uses. "
                                 f"{self._roots_sentence()}", param=param)
        normal = place(path)
        globbed = glob_base(normal.path)
        base = Place(normal.scheme, globbed[0]) if globbed is not None else normal
        if not self._readable(base) or not self._readable(normal):
            raise self._outside(path, param)
        # The job reads the normalised URL: an object store takes `..` literally.
        return normal.url() + ("/" if path.endswith("/") else "")

    def may_list(self, url: str) -> bool:
        return self.open or self._readable(place(url))

    def check_found(self, url: str, param: str) -> None:
        if not self.may_list(url):
            raise InvalidRequest(f"'{url}' leads outside the input roots of project "
                                 f"'{self.project}' (a symbolic link?); it cannot be read.",
                                 param=param)

    def _readable(self, target: Place) -> bool:
        return any(target.within(place(root)) for root in self.input_roots) \
            and not self._protected(target)

    def _protected(self, target: Place) -> bool:
        return any(target.within(place(p)) for p in self.protected)

    def _outside(self, path: str, param: str) -> InvalidRequest:
        return InvalidRequest(f"'{path}' is outside the input roots of project "
                              f"'{self.project}'. {self._roots_sentence()}", param=param)

    def _roots_sentence(self) -> str:
        if not self.input_roots:
            return ("The project has no input roots: give its uploaded files by id "
                    "(file_ids).")
        return (f"Its input roots: {', '.join(self.input_roots)}; its uploaded files may "
                f"also be given by id (file_ids).")

    # -- outputs -----------------------------------------------------------------------

    def output_base(self, output_path: str | None) -> str:
        """The directory under which a job writes its own directory."""
        if output_path is None:
            return self.output_root
        if self.open:
            return output_path
        _no_chain(output_path, "output_path")
        target = place(output_path)
        if target.within(place(self.output_root)):
            return target.url()
        if any(target.within(place(root)) for root in self.output_roots) \
                and not self._protected(target):
            return target.url()
        roots = ", ".join((self.output_root + "/", *self.output_roots))
        raise InvalidRequest(f"'output_path' '{output_path}' is outside the output roots of "
                             f"project '{self.project}' ({roots}).", param="output_path")


def _no_chain(path: str, param: str) -> None:
    # fsspec reads `a::b` as a file system inside another: the outer one (which may be
    # any protocol) would be reached whatever `a` looks like.
    if "::" in path:
        raise InvalidRequest(f"'{path}' chains file systems with '::', which jobs on a "
                             f"shared server may not do.", param=param)
