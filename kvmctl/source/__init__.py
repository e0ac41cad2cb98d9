"""Where a sync's manifests come from: a git repository, a ref and a path in it.

`GitCache.remote_commit` asks the remote which commit a ref names now (one `git ls-remote`, no
objects fetched), so a poll costs one round trip; `GitCache.checkout` fetches that one commit
shallowly into a bare cache repository, once, and extracts the tree of the path into a directory
of its own, read by the manifest loader like any other directory.

Why the git command line and not a library (dulwich, pygit2): the git a user has already
reaches their repositories. It speaks every transport (local paths, file://, git://, http(s)://,
ssh:// through the user's ssh config and agent) and uses the user's credential helpers, proxies,
CA bundles and `url.<base>.insteadOf` rewrites exactly as `git clone` does, so a repository that
clones in the user's shell syncs here too, and nothing of that is re-implemented or drifts. The
price is a process per step (milliseconds; a poll is one `git ls-remote`) and parsing git's
output, which is done only for formats made for machines (ls-remote, cat-file --batch-check,
log --format with NUL separators, for-each-ref, tar).

The user's global and the system git config (credentials, ssh, proxies, CA bundles) are kept
on purpose, so no GIT_CONFIG_NOSYSTEM and no other HOME; what would change what is read is
pinned instead: attributes of the cache repositories turn off export-ignore, export-subst,
filters (LFS smudge) and EOL conversion, so the tree is the committed bytes; hooks are off;
pathspecs are literal; GIT_DIR and the like (set inside git hooks) are dropped. Git never
prompts: prompts fail (no terminal, GIT_ASKPASS and SSH askpass refuse), so a missing password
is an error and never a hang, and every git call has a timeout after which its whole process
group is killed.

Not supported: submodules (a submodule in the path is an empty directory, the path being one is
an error) and Git LFS (LFS pointer files are extracted as the small text files they are).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import SourceError
from .commit import Commit

SCHEMES = ("file", "http", "https", "ssh", "git")
KEEP_TREES = 5  # extracted trees kept per source (repository and path); older ones are removed

_SHA = re.compile(r"(?:[0-9a-fA-F]{40}|[0-9a-fA-F]{64})")
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)", re.DOTALL)
# git's scp-like syntax, with the user required: `host:path` alone reads too easily as a local
# path with a colon, and requiring `user@` keeps `<transport>::<address>` (ext::) out.
_SCP = re.compile(r"(?P<user>[^@/:\s]+)@(?P<host>[^/:\s\[\]]+|\[[0-9A-Fa-f:.]+\]):(?P<path>.+)")
_TRANSPORT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*::")  # git's <transport>::<address> (ext::)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters `git check-ref-format` refuses anywhere in a ref (rule 4, 5 and 10 of its manual).
_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
# userinfo with a password in any URL git may print back (belt and braces: git anonymises most)
_USERINFO = re.compile(r"(?<=://)[^/\s@]*:[^/\s@]*@")

# Variables that make git work on another repository than the one named (set inside git hooks,
# for example): `git rev-parse --local-env-vars`, plus the quarantine of a pre-receive hook.
_LOCAL_ENV = ("GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS",
              "GIT_CONFIG_COUNT", "GIT_OBJECT_DIRECTORY", "GIT_DIR", "GIT_WORK_TREE",
              "GIT_IMPLICIT_WORK_TREE", "GIT_GRAFT_FILE", "GIT_INDEX_FILE",
              "GIT_NO_REPLACE_OBJECTS", "GIT_REPLACE_REF_BASE", "GIT_PREFIX",
              "GIT_INTERNAL_SUPER_PREFIX", "GIT_SHALLOW_FILE", "GIT_COMMON_DIR",
              "GIT_NAMESPACE", "GIT_QUARANTINE_PATH")
_KVMCTL_SECRETS = frozenset({"KVMCTL_CONTROLLER_TOKEN", "KVMCTL_WEBHOOK_SECRET"})

# Before the subcommand, on every call. protocol.file.allow: a file:// source is fetched like any
# other (git restricts it for submodules only, which are not fetched). hooksPath: a global hooks
# directory never runs in a cache repository (reference-transaction hooks would on every fetch).
_CONFIG = ("-c", "protocol.file.allow=always", "-c", "core.hooksPath=/dev/null",
           "-c", "core.autocrlf=false", "--literal-pathspecs")

# $GIT_DIR/info/attributes outranks the repository's own .gitattributes: the extracted tree is
# the committed bytes, whatever the repository asks of `git archive` or of a checkout.
_ATTRIBUTES = ("# kvmctl: extract the committed bytes, without export-ignore/export-subst,\n"
               "# filters (LFS smudge), EOL or ident conversion\n"
               "* -export-ignore -export-subst -filter -text -eol -ident "
               "-working-tree-encoding\n")


@dataclass(frozen=True)
class SourceSpec:
    """A repository, a ref in it and a directory (or file) of manifests in that ref.

    repo: a URL (file, http, https, ssh, git), scp-like `user@host:path`, or an absolute path of
    a local repository (bare or a working clone: only its committed refs are read, its working
    tree and index never). ref: a branch, a tag, a full ref name, `HEAD` (the remote's default
    branch) or a full commit id. path: relative to the repository's root, `.` for all of it.
    Build one with `SourceSpec.of`, which normalises and validates.
    """

    repo: str
    ref: str = "HEAD"
    path: str = "."

    @classmethod
    def of(cls, repo: str, ref: str = "HEAD", path: str = ".") -> SourceSpec:
        """The spec for what a user wrote: a relative local path made absolute (git runs from
        the cache, not from the user's directory), the path normalised, then validated."""
        repo = repo.strip()
        if repo and _kind(repo) == "local" and not repo.startswith("-"):
            repo = os.path.abspath(os.path.expanduser(repo))
        ref = ref.strip() or "HEAD"
        if _SHA.fullmatch(ref):
            ref = ref.lower()
        spec = cls(repo, ref, _normal_path(repo, ref, path))
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise SourceError if git could misread this spec or it reaches outside the tree."""
        _check_repo(self.repo, self.safe_repo)
        _check_ref(self.ref, self.safe_repo)
        if self.path != _normal_path(self.repo, self.ref, self.path):
            raise SourceError(f"{self.display}: path {self.path!r} is not in normal form "
                              f"(SourceSpec.of normalises it)")

    @property
    def is_commit(self) -> bool:
        """The ref is a full commit id (nothing to resolve on the remote)."""
        return _SHA.fullmatch(self.ref) is not None

    @property
    def safe_repo(self) -> str:
        """The repository with any credential removed, for messages and status."""
        return _safe_repo(self.repo)

    @property
    def display(self) -> str:
        return f"{self.safe_repo}@{self.ref}:{self.path}"

    def _secrets(self) -> tuple[str, ...]:
        """The credential parts of the URL, raw and percent-decoded, to scrub from git's words."""
        parts = _split_url(self.repo)
        if parts is None or not parts[1]:
            return ()
        user, _, password = parts[1].partition(":")
        found = [password] if password else []
        if parts[0].lower() in ("http", "https"):
            found.append(user)  # a token is often given as the user name alone
        out = {p for part in found for p in (part, unquote(part)) if len(p) >= 3}
        return tuple(sorted(out, key=len, reverse=True))


@dataclass(frozen=True)
class Checkout:
    """One commit of a source, extracted: `root` holds the tree of `spec.path` at `commit`
    (as `root/<path>/...`). It stays on disk until KEEP_TREES newer checkouts of the same
    repository and path have been made."""

    spec: SourceSpec
    commit: Commit
    root: str

    @property
    def manifests(self) -> str:
        """The directory (or file) of the manifests: spec.path inside root."""
        if self.spec.path == ".":
            return self.root
        return os.path.join(self.root, *self.spec.path.split("/"))


_LOCKS: dict[str, threading.Lock] = {}  # per cache repository, shared by every GitCache
_LOCKS_GUARD = threading.Lock()


class GitCache:
    """Bare cache repositories (one per repository URL, fetched shallowly) and extracted trees,
    under one directory private to the user (0700).

    Safe to share between threads and between processes using the same directory: checkouts
    of one repository take turns (a thread lock, then an flock of `repos/<hash>.lock`), those
    of different repositories run side by side. remote_commit touches no cache file.
    """

    def __init__(self, cache_dir: str, timeout: float = 60.0) -> None:
        self.cache_dir = os.path.abspath(cache_dir)
        self.timeout = timeout
        try:
            for sub in ("", "repos", "trees"):
                path = os.path.join(self.cache_dir, sub)
                os.makedirs(path, mode=0o700, exist_ok=True)
                os.chmod(path, 0o700)  # makedirs obeys the umask; the directory may pre-exist
        except OSError as error:
            raise SourceError(f"git cache {self.cache_dir}: {error.strerror}") from None

    # -- the two operations ---------------------------------------------------------------

    def remote_commit(self, spec: SourceSpec) -> str:
        """The commit the ref names on the remote now, without fetching objects.

        A full commit id is returned as it is. HEAD is the remote's HEAD; a name is tried as
        refs/heads/<ref>, refs/tags/<ref> (an annotated tag peeled to its commit), then as the
        exact ref name.
        """
        spec.validate()
        if spec.is_commit:
            return spec.ref
        out = self._git(spec, "ls-remote", ["ls-remote", "--", spec.repo, spec.ref,
                                            spec.ref + "^{}"])
        refs: dict[str, str] = {}
        for line in out.decode("utf-8", "replace").splitlines():
            sha, _, name = line.partition("\t")
            if _SHA.fullmatch(sha) and name:
                refs[name] = sha.lower()
        names = ["HEAD"] if spec.ref == "HEAD" else [
            f"refs/heads/{spec.ref}", f"refs/tags/{spec.ref}", spec.ref]
        for name in names:
            for candidate in (name + "^{}", name):
                if candidate in refs:
                    return refs[candidate]
        raise SourceError(f"{spec.display}: ref {spec.ref!r} not found in {spec.safe_repo}")

    def checkout(self, spec: SourceSpec, sha: str | None = None) -> Checkout:
        """The tree of spec.path at commit `sha` (by default the commit the ref names now).

        The commit is fetched only when the cache lacks it, with depth 1 and nothing else; a
        path the commit does not have is an error, never an empty set of manifests.
        """
        spec.validate()
        if sha is None:
            sha = self.remote_commit(spec)
        elif not _SHA.fullmatch(sha):
            raise SourceError(f"{spec.display}: {sha!r} is not a full commit id")
        sha = sha.lower()
        try:
            return self._checkout(spec, sha)
        except OSError as error:  # the cache's own files: full disk, permissions
            raise SourceError(f"{spec.display}: git cache {self.cache_dir}: {error}") from None

    def _checkout(self, spec: SourceSpec, sha: str) -> Checkout:
        repo_dir = self._repo_dir(spec)
        with self._locked(repo_dir, spec):
            self._ensure_repo(repo_dir, spec)
            commit_sha, kind = self._lookup(repo_dir, spec, sha)
            if commit_sha is None:
                self._fetch(repo_dir, spec, sha)
                commit_sha, kind = self._lookup(repo_dir, spec, sha)
                if commit_sha is None:
                    raise SourceError(f"{spec.display}: commit {sha} not found in "
                                      f"{spec.safe_repo}")
            if kind is None:
                raise SourceError(f"{spec.display}: path {spec.path!r} does not exist at "
                                  f"commit {commit_sha}")
            if kind not in ("tree", "blob"):
                raise SourceError(f"{spec.display}: path {spec.path!r} is a submodule at "
                                  f"commit {commit_sha}; submodules are not supported")
            commit = self._commit(repo_dir, spec, commit_sha)
            root = self._tree(repo_dir, spec, commit_sha)
        return Checkout(spec, commit, root)

    # -- the cache repository -------------------------------------------------------------

    def _repo_dir(self, spec: SourceSpec) -> str:
        key = hashlib.sha256(spec.repo.encode()).hexdigest()[:32]
        return os.path.join(self.cache_dir, "repos", key + ".git")

    @contextmanager
    def _locked(self, repo_dir: str, spec: SourceSpec) -> Iterator[None]:
        """Exclusive use of one cache repository and its trees: a thread lock for the threads
        of this process, an flock for other processes (the kernel drops it if we die)."""
        # The holder runs a few git calls, each bounded by the timeout.
        wait = max(4 * self.timeout, 10.0)
        with _LOCKS_GUARD:
            lock = _LOCKS.setdefault(repo_dir, threading.Lock())
        if not lock.acquire(timeout=wait):
            raise SourceError(f"{spec.display}: the cache {repo_dir} stayed busy for {wait:g} s")
        try:
            fd = os.open(repo_dir + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                deadline = time.monotonic() + wait
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise SourceError(f"{spec.display}: the cache {repo_dir} is held "
                                              f"by another process for {wait:g} s") from None
                        time.sleep(0.05)
                yield
            finally:
                os.close(fd)
        finally:
            lock.release()

    def _ensure_repo(self, repo_dir: str, spec: SourceSpec) -> None:
        attributes = os.path.join(repo_dir, "info", "attributes")
        if os.path.isfile(attributes):
            return
        if os.path.lexists(repo_dir):  # a previous run died half-way: start afresh
            shutil.rmtree(repo_dir, ignore_errors=True)
        temp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(repo_dir))
        try:
            # --template= : none of the user's init templates (hooks) in a cache repository
            self._git(spec, "init", ["init", "--quiet", "--bare", "--template=", temp])
            os.makedirs(os.path.join(temp, "info"), mode=0o700, exist_ok=True)
            with open(os.path.join(temp, "info", "attributes"), "w", encoding="utf-8") as f:
                f.write(_ATTRIBUTES)
            os.rename(temp, repo_dir)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    def _lookup(self, repo_dir: str, spec: SourceSpec, sha: str
                ) -> tuple[str | None, str | None]:
        """(the commit, or None if the cache lacks it; the type of spec.path in it, or None)."""
        path = f"{sha}^{{tree}}" if spec.path == "." else f"{sha}:{spec.path}"
        out = self._git(spec, "cat-file", ["cat-file", "--batch-check"], git_dir=repo_dir,
                        stdin=f"{sha}^{{commit}}\n{path}\n".encode())
        lines = out.decode("utf-8", "replace").splitlines()
        found: list[tuple[str, str] | None] = []
        for line in lines[:2]:
            words = line.split(" ")
            ok = len(words) == 3 and _SHA.fullmatch(words[0]) is not None
            found.append((words[0].lower(), words[1]) if ok else None)
        found += [None] * (2 - len(found))
        commit, entry = found
        if commit is None:
            return None, None
        return commit[0], entry[1] if entry else None

    def _fetch(self, repo_dir: str, spec: SourceSpec, sha: str) -> None:
        """Fetch the commit alone (any protocol v2 server and most others serve a commit by
        id); else the tips of all branches and tags, which serves a commit that is one."""
        flags = ["fetch", "--depth=1", "--no-tags", "--force", "--no-recurse-submodules",
                 "--no-write-fetch-head", "--"]
        try:
            self._git(spec, "fetch", [*flags, spec.repo, f"+{sha}:refs/kvmctl/{sha}"],
                      git_dir=repo_dir)
            return
        except _Timeout:
            raise
        except SourceError as refused:
            first = refused
        # --prune: the scan refs mirror the remote's tips and do not pile up
        self._git(spec, "fetch", ["fetch", "--prune", *flags[1:], spec.repo,
                                  "+refs/heads/*:refs/kvmctl-scan/heads/*",
                                  "+refs/tags/*:refs/kvmctl-scan/tags/*"], git_dir=repo_dir)
        if self._lookup(repo_dir, spec, sha)[0] is None:
            raise SourceError(f"{spec.display}: commit {sha} not found in {spec.safe_repo}: it "
                              f"is no branch or tag tip, and fetching it by id failed "
                              f"({_last_words(str(first))})")
        self._git(spec, "update-ref", ["update-ref", f"refs/kvmctl/{sha}", sha],
                  git_dir=repo_dir)

    def _commit(self, repo_dir: str, spec: SourceSpec, sha: str) -> Commit:
        out = self._git(spec, "log", ["log", "-1", "--no-show-signature", "--no-mailmap",
                                      "--format=%H%x00%an%x00%ae%x00%ct%x00%s", sha, "--"],
                        git_dir=repo_dir)
        fields = out.decode("utf-8", "replace").rstrip("\n").split("\0")
        if len(fields) != 5 or not _SHA.fullmatch(fields[0]):
            raise SourceError(f"{spec.display}: unexpected output of git log for {sha}")
        full, author, email, when, subject = fields
        return Commit(sha=full.lower(), author=author, email=email,
                      time=float(when) if when.isdigit() else 0.0, message=subject)

    # -- extracted trees ------------------------------------------------------------------

    def _tree(self, repo_dir: str, spec: SourceSpec, sha: str) -> str:
        trees = os.path.join(self.cache_dir, "trees")
        key = _source_key(spec)
        final = os.path.join(trees, f"{sha}-{key}")
        if os.path.isdir(final):
            _touch(final)
            return final
        temp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=trees)
        fd, tar_path = tempfile.mkstemp(prefix=f".tmp-{key}-", suffix=".tar", dir=trees)
        os.close(fd)
        try:
            paths = [] if spec.path == "." else ["--", spec.path]
            self._git(spec, "archive", ["archive", "--format=tar", f"--output={tar_path}", sha,
                                        *paths], git_dir=repo_dir)
            _extract(tar_path, temp, spec, sha)
            os.rename(temp, final)  # whole or not at all: a reader never sees half a tree
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        finally:
            os.unlink(tar_path)
        _touch(final)
        self._prune(repo_dir, spec, key)
        return final

    def _prune(self, repo_dir: str, spec: SourceSpec, key: str) -> None:
        """Keep the KEEP_TREES most recently used trees of this source, and refs only for
        commits some tree still shows (git's auto gc then drops the rest)."""
        trees = os.path.join(self.cache_dir, "trees")
        mine: list[tuple[int, str]] = []
        for name in os.listdir(trees):
            path = os.path.join(trees, name)
            if name.startswith(f".tmp-{key}-"):  # left by a run that died; we hold the lock
                _remove(path)
            elif name.endswith(f"-{key}") and not name.startswith("."):
                mine.append((os.stat(path).st_mtime_ns, name))
        for _, name in sorted(mine, reverse=True)[KEEP_TREES:]:
            _remove(os.path.join(trees, name))
        shown = {name.partition("-")[0] for name in os.listdir(trees)}
        out = self._git(spec, "for-each-ref", ["for-each-ref", "--format=%(refname)",
                                               "refs/kvmctl/"], git_dir=repo_dir)
        stale = [ref for ref in out.decode("utf-8", "replace").splitlines()
                 if ref.rpartition("/")[2] not in shown]
        if stale:
            self._git(spec, "update-ref", ["update-ref", "--stdin"], git_dir=repo_dir,
                      stdin="".join(f"delete {ref}\n" for ref in stale).encode())

    # -- running git ----------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        # Nor are kvmctl's own secrets (the controller's token, the webhook secret) handed to
        # git, ssh or a credential helper.
        env = {k: v for k, v in os.environ.items()
               if k not in _LOCAL_ENV and k not in _KVMCTL_SECRETS}
        refuse = shutil.which("false") or "/bin/false"
        env.update({
            "GIT_TERMINAL_PROMPT": "0",  # no password prompt on a terminal
            "GIT_ASKPASS": refuse,  # nor through a helper program: a refusal, so git fails
            "SSH_ASKPASS": refuse,
            "SSH_ASKPASS_REQUIRE": "never",  # no ssh-askpass window either
            "GCM_INTERACTIVE": "never",  # Git Credential Manager: no browser or device flow
            "LC_ALL": "C",  # git's messages in English, parsed nowhere but shown
            # git never wanders from the cache directory into an enclosing repository
            "GIT_CEILING_DIRECTORIES": os.path.dirname(self.cache_dir),
        })
        return env

    def _git(self, spec: SourceSpec, what: str, args: Sequence[str], *,
             git_dir: str | None = None, stdin: bytes | None = None) -> bytes:
        """git's stdout; SourceError naming the source and git's last words otherwise."""
        command = ["git", *_CONFIG, *([f"--git-dir={git_dir}"] if git_dir else []), *args]
        try:
            # A session of its own: no controlling terminal, so ssh cannot prompt either, and
            # a timeout kills the whole group (ssh, git-remote-https), not git alone.
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.cache_dir,
                env=self._env(), start_new_session=True)
        except OSError as error:
            raise SourceError(f"{spec.display}: cannot run git: {error.strerror}") from None
        try:
            out, err = process.communicate(stdin, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise _Timeout(f"{spec.display}: git {what} did not finish within "
                           f"{self.timeout:g} s") from None
        except BaseException:
            _kill_group(process)
            raise
        if process.returncode != 0:
            said = _scrub(_last_words(err.decode("utf-8", "replace")), spec)
            raise SourceError(f"{spec.display}: git {what} failed: "
                              f"{said or f'exit status {process.returncode}'}")
        return out


class _Timeout(SourceError):
    """A git call ran out of time (no fallback is tried: it would time out as well)."""


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill the process group this GitCache started for one git call (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a child left the group and holds a pipe: let it be
        process.kill()
        process.wait()


def _last_words(stderr: str) -> str:
    """git's last fatal/error line (hints and advice follow it), else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("fatal:", "error:")):
            return line
    return lines[-1] if lines else ""


def _scrub(text: str, spec: SourceSpec) -> str:
    text = text.replace(spec.repo, spec.safe_repo)
    for secret in spec._secrets():
        text = text.replace(secret, "***")
    return _USERINFO.sub("", text)


# -- validation ----------------------------------------------------------------------------

def _kind(repo: str) -> str:
    if _URL.fullmatch(repo):
        return "url"
    if _TRANSPORT.match(repo):
        return "transport"
    if _SCP.fullmatch(repo):
        return "scp"
    return "local"


def _split_url(repo: str) -> tuple[str, str, str, str] | None:
    """(scheme, userinfo, host[:port], the rest from the first '/'), or None if no URL."""
    found = _URL.fullmatch(repo)
    if not found:
        return None
    netloc, slash, tail = found["rest"].partition("/")
    userinfo, _, hostport = netloc.rpartition("@")
    return found["scheme"], userinfo, hostport, slash + tail


def _safe_repo(repo: str) -> str:
    parts = _split_url(repo)
    if parts is None:
        return repo
    scheme, userinfo, hostport, tail = parts
    user = userinfo.partition(":")[0]
    # http(s): a token often stands as the user name alone; ssh/git: the user is no secret
    keep = "" if scheme.lower() in ("http", "https") or not user else user + "@"
    path, question, _ = tail.partition("?")
    return f"{scheme}://{keep}{hostport}{path}{'?…' if question else ''}"


def _check_repo(repo: str, safe: str) -> None:
    if not repo:
        raise SourceError("a source needs a repository")
    if _CONTROL.search(repo):
        raise SourceError(f"repository {safe!r}: control characters are not allowed")
    if repo.startswith("-"):
        raise SourceError(f"repository {safe!r}: must not begin with '-' (git would read an "
                          f"option)")
    parts = _split_url(repo)
    if parts is not None:
        scheme, _, hostport, _ = parts
        if scheme.lower() not in SCHEMES:
            raise SourceError(f"repository {safe!r}: scheme {scheme!r} is not supported "
                              f"(use one of {', '.join(SCHEMES)}, user@host:path or a local "
                              f"path)")
        if scheme.lower() != "file" and not hostport:
            raise SourceError(f"repository {safe!r}: the URL has no host")
        if hostport.startswith("-"):
            raise SourceError(f"repository {safe!r}: a host must not begin with '-'")
    elif _kind(repo) == "transport":
        raise SourceError(f"repository {safe!r}: <transport>::<address> is not supported")
    elif _kind(repo) == "local":
        if not os.path.isabs(repo):
            raise SourceError(f"repository {safe!r}: a local path must be absolute "
                              f"(SourceSpec.of resolves a relative one)")
        if not os.path.isdir(repo):
            raise SourceError(f"repository {safe!r} is neither a URL (file, http, https, ssh, "
                              f"git), nor user@host:path, nor a directory")


def _check_ref(ref: str, safe_repo: str) -> None:
    """`git check-ref-format --allow-onelevel`, and no leading '-', or a full commit id."""
    where = f"ref {ref!r} of {safe_repo}"
    if _SHA.fullmatch(ref) or ref == "HEAD":
        return
    if not ref:
        raise SourceError(f"{where}: empty")
    if ref.startswith("-"):
        raise SourceError(f"{where}: must not begin with '-'")
    if _REF_BAD.search(ref):
        raise SourceError(f"{where}: space, control characters and ~ ^ : ? * [ \\ are not "
                          f"allowed in a ref")
    if ".." in ref or "@{" in ref or ref == "@" or "//" in ref:
        raise SourceError(f"{where}: '..', '@{{', '//' and a lone '@' are not allowed")
    if ref.startswith("/") or ref.endswith(("/", ".")):
        raise SourceError(f"{where}: must not begin with '/' nor end with '/' or '.'")
    for part in ref.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            raise SourceError(f"{where}: no component may begin with '.' or end with '.lock'")


def _normal_path(repo: str, ref: str, path: str) -> str:
    """The path as `a/b`, or `.`; SourceError if it is absolute or climbs out with '..'."""
    where = f"{_safe_repo(repo)}@{ref}: path {path!r}"
    text = path.strip()
    if _CONTROL.search(text):
        raise SourceError(f"{where}: control characters are not allowed")
    if text.startswith("/"):
        raise SourceError(f"{where}: must be relative to the repository's root")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise SourceError(f"{where}: must not leave the repository ('..')")
    return "/".join(parts) or "."


# -- extraction ----------------------------------------------------------------------------

def _source_key(spec: SourceSpec) -> str:
    return hashlib.sha256(f"{spec.repo}\0{spec.path}".encode()).hexdigest()[:16]


def _inside(name: str) -> bool:
    """A relative, normalised tar path that stays in the tree."""
    return not name.startswith("/") and posixpath.normpath(name).split("/")[0] != ".."


def _extract(tar_path: str, dest: str, spec: SourceSpec, sha: str) -> None:
    """Extract git's archive into dest, refusing anything that could write or point outside.

    git archive makes only directories, regular files and symlinks, each named once and none
    below a symlink; anything else is refused before a byte is written, and tarfile's "data"
    filter checks again. A symlink must resolve, on disk, inside dest: one pointing outside
    (or at a file outside spec.path, which is not extracted) fails the checkout rather than
    drop a manifest silently, since a missing manifest could make a sync delete its objects.
    """
    where = f"{spec.display}: commit {sha}"
    try:
        with tarfile.open(tar_path, mode="r:") as archive:
            members = archive.getmembers()
            seen: set[str] = set()
            links: set[str] = set()
            for member in members:
                name = member.name.rstrip("/")
                if not _inside(name) or posixpath.normpath(name) != name:
                    raise SourceError(f"{where}: the archive names {name!r}")
                above = member.isdir() and spec.path.startswith(name + "/")  # its parents
                if spec.path != "." and name != spec.path and not above \
                        and not name.startswith(spec.path + "/"):
                    raise SourceError(f"{where}: the archive names {name!r}, outside the path")
                parents = name.split("/")[:-1]
                if name in seen or any("/".join(parents[:n]) in links
                                       for n in range(1, len(parents) + 1)):
                    raise SourceError(f"{where}: the archive writes {name!r} twice or "
                                      f"through a symlink")
                seen.add(name)
                if member.issym():
                    target = posixpath.join(posixpath.dirname(name), member.linkname)
                    if member.linkname.startswith("/") or not _inside(target):
                        raise SourceError(f"{where}: {name} is a symlink to "
                                          f"{member.linkname!r}, outside the tree")
                    links.add(name)
                elif not (member.isfile() or member.isdir()):
                    raise SourceError(f"{where}: {name} is neither a file, a directory nor a "
                                      f"symlink")
            archive.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError) as error:
        raise SourceError(f"{where}: cannot extract the tree: {error}") from None
    real_dest = os.path.realpath(dest)
    for name in sorted(links):
        try:
            real = os.path.realpath(os.path.join(dest, *name.split("/")), strict=True)
        except OSError:
            real = ""
        if not real or os.path.commonpath([real, real_dest]) != real_dest:
            raise SourceError(f"{where}: {name} is a symlink that does not resolve inside "
                              f"{spec.path!r}")
    # Directories get the umask's mode from tarfile; make the tree's modes the same everywhere.
    os.chmod(dest, 0o755)
    for top, dirs, _ in os.walk(dest):
        for sub in dirs:
            path = os.path.join(top, sub)
            if not os.path.islink(path):
                os.chmod(path, 0o755)


def _touch(path: str) -> None:
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
