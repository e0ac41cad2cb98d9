"""kvmctl.source against real git: repositories made in tmp_path, served as local paths, file://
URLs and by `git daemon` on 127.0.0.1; nothing is mocked."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmctl.errors import SourceError
from kvmctl.source import KEEP_TREES, Checkout, GitCache, SourceSpec

T0 = 1_700_000_000  # commit times of the test repositories, one second apart


@pytest.fixture(autouse=True)
def _isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests see neither the developer's nor the system's git config."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_CONFIG_PARAMETERS"):
        monkeypatch.delenv(name, raising=False)


def git(cwd: Path, *args: str, when: int = T0) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="Ada Lovelace", GIT_AUTHOR_EMAIL="ada@example.org",
               GIT_COMMITTER_NAME="Ada Lovelace", GIT_COMMITTER_EMAIL="ada@example.org",
               GIT_AUTHOR_DATE=f"{when} +0000", GIT_COMMITTER_DATE=f"{when} +0000")
    done = subprocess.run(["git", "-c", "init.defaultBranch=main", "-C", str(cwd), *args],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def commit(work: Path, files: dict[str, str], message: str, when: int) -> str:
    for name, text in files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", message, when=when)
    return git(work, "rev-parse", "HEAD")


@dataclass(frozen=True)
class Upstream:
    work: Path  # a working clone (the origin itself)
    bare: Path  # a bare clone of it
    first: str  # main~1: manifests/a.yaml
    second: str  # main: manifests/a.yaml, b.yaml, run.sh (executable)
    dev: str  # branch dev: adds manifests/dev.yaml
    annotated: str  # the tag object of v1-annotated (points at first)

    @property
    def url(self) -> str:
        return self.work.as_uri()


@pytest.fixture
def upstream(tmp_path: Path) -> Upstream:
    work = tmp_path / "upstream"
    work.mkdir()
    git(work, "init", "-q")
    first = commit(work, {"manifests/a.yaml": "a: 1\n", "README": "hi\n"}, "first", T0)
    git(work, "tag", "v1")
    git(work, "tag", "-a", "v1-annotated", "-m", "annotated")
    (work / "manifests" / "run.sh").write_text("#!/bin/sh\n", encoding="utf-8")
    (work / "manifests" / "run.sh").chmod(0o755)
    second = commit(work, {"manifests/b.yaml": "b: 2\n"}, "second: add b\n\nbody", T0 + 1)
    git(work, "checkout", "-q", "-b", "dev")
    dev = commit(work, {"manifests/dev.yaml": "dev: 3\n"}, "dev", T0 + 2)
    git(work, "checkout", "-q", "main")
    bare = tmp_path / "bare.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    return Upstream(work, bare, first, second, dev, git(work, "rev-parse", "v1-annotated"))


@pytest.fixture
def cache(tmp_path: Path) -> GitCache:
    return GitCache(str(tmp_path / "cache"), timeout=30)


def files(checkout: Checkout) -> dict[str, str]:
    root = Path(checkout.manifests)
    return {str(p.relative_to(root)): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*")) if p.is_file()}


def trees(cache: GitCache) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(cache.cache_dir, "trees"))
                  if not n.startswith("."))


# -- SourceSpec ---------------------------------------------------------------------------

def test_display_strips_every_credential() -> None:
    spec = SourceSpec.of("https://user:s3cret@git.example.org/infra.git", "main", "vms")
    assert spec.display == "https://git.example.org/infra.git@main:vms"
    assert SourceSpec.of("https://ghp_token123@github.com/o/r.git").display \
        == "https://github.com/o/r.git@HEAD:."
    assert SourceSpec.of("ssh://git:pw@host:2222/r.git").safe_repo == "ssh://git@host:2222/r.git"
    assert SourceSpec.of("http://h/r.git?access_token=abc").safe_repo == "http://h/r.git?…"
    assert SourceSpec.of("git@github.com:o/r.git", "v1").display == "git@github.com:o/r.git@v1:."


def test_of_normalises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = SourceSpec.of("repo", "", "./vms//prod/")
    assert spec == SourceSpec(str(tmp_path / "repo"), "HEAD", "vms/prod")
    assert SourceSpec.of(str(tmp_path), path="").path == "."
    sha = "AB" * 20
    assert SourceSpec.of(str(tmp_path), sha).ref == sha.lower()
    assert SourceSpec.of(str(tmp_path), "c" * 64).is_commit


@pytest.mark.parametrize("repo", ["https://h/r.git", "http://h:8080/r", "git://h/r.git",
                                  "ssh://git@h/r.git", "file:///srv/r.git",
                                  "git@github.com:o/r.git", "deploy@[::1]:r.git"])
def test_accepted_repositories(repo: str) -> None:
    assert SourceSpec.of(repo).repo == repo


@pytest.mark.parametrize("repo,why", [
    ("", "needs a repository"),
    ("   ", "needs a repository"),
    ("ftp://h/r.git", "scheme 'ftp' is not supported"),
    ("ext::sh -c touch% /tmp/pwned", "::"),
    ("fd::17", "::"),
    ("/nonexistent/repo.git", "neither a URL"),
    ("https:///r.git", "no host"),
    ("ssh://-oProxyCommand=x/r", "must not begin with '-'"),
    ("--upload-pack=touch /tmp/x", "must not begin with '-'"),
    ("https://h/r\n.git", "control characters"),
])
def test_refused_repositories(repo: str, why: str) -> None:
    with pytest.raises(SourceError, match=why.replace("?", r"\?")):
        SourceSpec.of(repo)


@pytest.mark.parametrize("ref", ["main", "release/1.0", "refs/heads/main", "refs/pull/1/head",
                                 "v1.2.3", "HEAD", "a" * 40, "0123456789abcdef" * 4])
def test_accepted_refs(ref: str, tmp_path: Path) -> None:
    assert SourceSpec.of(str(tmp_path), ref).ref == ref


@pytest.mark.parametrize("ref", ["a..b", "a b", "x~1", "x^", "a:b", "a?", "a*", "a[b", "a\\b",
                                 "-x", "a.lock", "a/.b", "a@{1}", "@", "a/", "/a", "a//b",
                                 "a.", "a\tb"])
def test_refused_refs(ref: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="ref"):
        SourceSpec.of(str(tmp_path), ref)


@pytest.mark.parametrize("path", ["/etc", "../x", "a/../../x", "a/..", "..", "a\nb"])
def test_refused_paths(path: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="path"):
        SourceSpec.of(str(tmp_path), "HEAD", path)


def test_a_hand_made_spec_is_validated_by_the_cache(upstream: Upstream,
                                                    cache: GitCache) -> None:
    with pytest.raises(SourceError, match=r"\.\."):
        cache.checkout(SourceSpec(upstream.url, "main", "../etc"))
    with pytest.raises(SourceError, match="normal form"):
        cache.checkout(SourceSpec(upstream.url, "main", "./manifests"))
    with pytest.raises(SourceError, match="must be absolute"):
        cache.remote_commit(SourceSpec("upstream", "main"))


# -- remote_commit ------------------------------------------------------------------------

def test_remote_commit_resolves_every_kind_of_ref(upstream: Upstream, cache: GitCache) -> None:
    def at(ref: str) -> str:
        return cache.remote_commit(SourceSpec.of(upstream.url, ref))

    assert at("HEAD") == upstream.second
    assert at("main") == upstream.second
    assert at("refs/heads/main") == upstream.second
    assert at("dev") == upstream.dev
    assert at("v1") == upstream.first  # lightweight tag
    assert at("v1-annotated") == upstream.first  # peeled: the commit, not the tag object
    assert at("refs/tags/v1-annotated") == upstream.first
    assert upstream.annotated != upstream.first
    assert at("f" * 40) == "f" * 40  # a commit id is taken as it is, without asking


def test_remote_commit_sees_a_new_commit(upstream: Upstream, cache: GitCache) -> None:
    spec = SourceSpec.of(upstream.url, "main")
    assert cache.remote_commit(spec) == upstream.second
    third = commit(upstream.work, {"manifests/c.yaml": "c: 3\n"}, "third", T0 + 10)
    assert cache.remote_commit(spec) == third
    assert cache.checkout(spec).commit.sha == third


def test_unknown_ref(upstream: Upstream, cache: GitCache) -> None:
    with pytest.raises(SourceError, match=rf"ref 'nope' not found in {upstream.url}$"):
        cache.remote_commit(SourceSpec.of(upstream.url, "nope"))
    with pytest.raises(SourceError, match="not found"):
        cache.checkout(SourceSpec.of(upstream.url, "nope"))


def test_a_unreadable_repository_names_the_source(tmp_path: Path, cache: GitCache) -> None:
    (tmp_path / "empty").mkdir()
    spec = SourceSpec.of(str(tmp_path / "empty"), "main")
    with pytest.raises(SourceError) as caught:
        cache.remote_commit(spec)
    assert str(caught.value).startswith(f"{spec.display}: git ls-remote failed: fatal:")


# -- checkout -----------------------------------------------------------------------------

def test_checkout_of_a_file_url(upstream: Upstream, cache: GitCache) -> None:
    spec = SourceSpec.of(upstream.url, "main", "manifests")
    out = cache.checkout(spec)
    assert out.spec == spec
    assert out.commit.sha == upstream.second
    assert out.commit.author == "Ada Lovelace"
    assert out.commit.email == "ada@example.org"
    assert out.commit.time == T0 + 1
    assert out.commit.message == "second: add b"
    assert files(out) == {"a.yaml": "a: 1\n", "b.yaml": "b: 2\n", "run.sh": "#!/bin/sh\n"}
    assert out.manifests == os.path.join(out.root, "manifests")
    assert sorted(os.listdir(out.root)) == ["manifests"]  # only the path, not README


def test_checkout_of_the_whole_tree_and_of_a_file(upstream: Upstream, cache: GitCache) -> None:
    whole = cache.checkout(SourceSpec.of(upstream.url, "v1"))
    assert whole.manifests == whole.root
    assert files(whole) == {"README": "hi\n", "manifests/a.yaml": "a: 1\n"}
    one = cache.checkout(SourceSpec.of(upstream.url, "main", "manifests/b.yaml"))
    assert Path(one.manifests).read_text(encoding="utf-8") == "b: 2\n"
    assert os.listdir(os.path.join(one.root, "manifests")) == ["b.yaml"]


def test_checkout_by_branch_tag_annotated_tag_and_sha(upstream: Upstream,
                                                      cache: GitCache) -> None:
    for ref, sha in [("dev", upstream.dev), ("v1", upstream.first),
                     ("v1-annotated", upstream.first), (upstream.first, upstream.first),
                     ("HEAD", upstream.second)]:
        out = cache.checkout(SourceSpec.of(upstream.url, ref, "manifests"))
        assert out.commit.sha == sha, ref
    assert "dev.yaml" in files(cache.checkout(SourceSpec.of(upstream.url, "dev", "manifests")))


def test_checkout_of_an_older_commit_by_id(upstream: Upstream, cache: GitCache) -> None:
    """A commit that is no ref's tip, fetched by id (protocol v2 serves any commit)."""
    older = commit(upstream.work, {"manifests/old.yaml": "x\n"}, "older", T0 + 5)
    commit(upstream.work, {"manifests/new.yaml": "y\n"}, "newer", T0 + 6)
    spec = SourceSpec.of(upstream.url, "main", "manifests")
    out = cache.checkout(spec, older)
    assert out.commit.sha == older and out.commit.message == "older"
    assert "old.yaml" in files(out) and "new.yaml" not in files(out)
    by_ref = cache.checkout(SourceSpec.of(upstream.url, upstream.first, "manifests"))
    assert files(by_ref) == {"a.yaml": "a: 1\n"}


def test_checkout_of_a_working_clone_reads_commits_only(upstream: Upstream,
                                                        cache: GitCache) -> None:
    work = upstream.work
    (work / "manifests" / "a.yaml").write_text("a: changed, not committed\n", encoding="utf-8")
    (work / "manifests" / "staged.yaml").write_text("staged\n", encoding="utf-8")
    git(work, "add", "manifests/staged.yaml")
    (work / "manifests" / "untracked.yaml").write_text("untracked\n", encoding="utf-8")
    status = git(work, "status", "--porcelain", "-uall")
    index = hashlib.sha256((work / ".git" / "index").read_bytes()).hexdigest()
    listing = sorted(p.name for p in (work / "manifests").iterdir())

    spec = SourceSpec.of(str(work), "main", "manifests")
    assert spec.repo == str(work)
    out = cache.checkout(spec)

    assert out.commit.sha == upstream.second
    assert files(out) == {"a.yaml": "a: 1\n", "b.yaml": "b: 2\n", "run.sh": "#!/bin/sh\n"}
    assert git(work, "status", "--porcelain", "-uall") == status
    assert hashlib.sha256((work / ".git" / "index").read_bytes()).hexdigest() == index
    assert sorted(p.name for p in (work / "manifests").iterdir()) == listing
    assert (work / "manifests" / "a.yaml").read_text(encoding="utf-8").endswith("committed\n")
    assert git(work, "rev-parse", "--abbrev-ref", "HEAD") == "main"


def test_checkout_of_a_bare_repository_path(upstream: Upstream, cache: GitCache,
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = SourceSpec.of("bare.git", "dev", "manifests")  # relative: resolved
    assert spec.repo == str(upstream.bare)
    out = cache.checkout(spec)
    assert out.commit.sha == upstream.dev
    assert sorted(files(out)) == ["a.yaml", "b.yaml", "dev.yaml", "run.sh"]


def test_a_missing_path_is_an_error_never_an_empty_set(upstream: Upstream,
                                                       cache: GitCache) -> None:
    spec = SourceSpec.of(upstream.url, "main", "clusters/prod")
    with pytest.raises(SourceError, match=rf"path 'clusters/prod' does not exist at commit "
                                          rf"{upstream.second}"):
        cache.checkout(spec)
    # b.yaml came with the second commit: the first does not have it
    with pytest.raises(SourceError, match="does not exist"):
        cache.checkout(SourceSpec.of(upstream.url, "main", "manifests/b.yaml"), upstream.first)
    assert trees(cache) == []


def test_an_unknown_commit_id(upstream: Upstream, cache: GitCache) -> None:
    with pytest.raises(SourceError, match="not found"):
        cache.checkout(SourceSpec.of(upstream.url, "main"), "0" * 40)
    with pytest.raises(SourceError, match="not a full commit id"):
        cache.checkout(SourceSpec.of(upstream.url, "main"), "abc123")


def test_a_cached_commit_is_not_fetched_again(upstream: Upstream, cache: GitCache,
                                              tmp_path: Path) -> None:
    spec = SourceSpec.of(upstream.url, "main", "manifests")
    first = cache.checkout(spec, upstream.second)
    other = cache.checkout(SourceSpec.of(upstream.url, "main", "."), upstream.second)
    upstream.work.rename(tmp_path / "gone")  # the remote disappears
    again = cache.checkout(spec, upstream.second)
    assert again == first
    assert files(cache.checkout(SourceSpec.of(upstream.url, "main", "."), upstream.second)) \
        == files(other)
    # a new path of a cached commit needs no fetch either
    assert cache.checkout(SourceSpec.of(upstream.url, "main", "README"),
                          upstream.second).commit.sha == upstream.second
    with pytest.raises(SourceError, match="git ls-remote failed"):
        cache.remote_commit(spec)


def test_extracted_tree_modes(upstream: Upstream, cache: GitCache) -> None:
    out = cache.checkout(SourceSpec.of(upstream.url, "main", "manifests"))

    def mode(path: str) -> int:
        return stat.S_IMODE(os.lstat(path).st_mode)

    assert mode(cache.cache_dir) == 0o700
    assert mode(os.path.join(cache.cache_dir, "trees")) == 0o700
    assert mode(out.root) == 0o755 and mode(out.manifests) == 0o755
    assert mode(os.path.join(out.manifests, "a.yaml")) == 0o644
    assert mode(os.path.join(out.manifests, "run.sh")) == 0o755
    assert os.path.dirname(out.root) == os.path.join(cache.cache_dir, "trees")
    assert os.path.basename(out.root).startswith(upstream.second + "-")


def test_export_ignore_and_filters_of_the_repository_do_not_apply(upstream: Upstream,
                                                                  cache: GitCache) -> None:
    sha = commit(upstream.work, {
        ".gitattributes": "manifests/*.yaml export-ignore\n*.txt text eol=crlf\n"
                          "manifests/subst.yaml export-subst\n",
        "manifests/subst.yaml": "id: $Format:%H$\n", "manifests/n.txt": "l1\nl2\n"},
        "attributes", T0 + 20)
    got = files(cache.checkout(SourceSpec.of(upstream.url, "main", "manifests"), sha))
    assert got["a.yaml"] == "a: 1\n"
    assert got["subst.yaml"] == "id: $Format:%H$\n"
    assert Path(cache.checkout(SourceSpec.of(upstream.url, "main", "manifests"), sha)
                .manifests, "n.txt").read_bytes() == b"l1\nl2\n"


def test_old_trees_are_pruned_to_five(upstream: Upstream, cache: GitCache) -> None:
    spec = SourceSpec.of(upstream.url, "main", "manifests")
    other = cache.checkout(SourceSpec.of(upstream.url, "dev", "."))  # another source
    outs = []
    for n in range(KEEP_TREES + 3):
        commit(upstream.work, {f"manifests/n{n}.yaml": f"{n}\n"}, f"n{n}", T0 + 100 + n)
        outs.append(cache.checkout(spec))
    mine = [t for t in trees(cache) if t != os.path.basename(other.root)]
    assert sorted(mine) == sorted(os.path.basename(o.root) for o in outs[-KEEP_TREES:])
    assert all(not os.path.exists(o.root) for o in outs[:-KEEP_TREES])
    assert os.path.isdir(other.root)  # another source's trees are not its to prune
    # reusing an older tree makes it the newest: it survives the next checkout
    assert cache.checkout(spec, outs[-KEEP_TREES].commit.sha).root == outs[-KEEP_TREES].root
    commit(upstream.work, {"manifests/last.yaml": "x\n"}, "last", T0 + 200)
    cache.checkout(spec)
    assert os.path.isdir(outs[-KEEP_TREES].root)
    assert not os.path.exists(outs[-KEEP_TREES + 1].root)
    # the cache repository keeps refs only for commits a tree still shows
    repo = Path(cache.cache_dir, "repos")
    (cache_repo,) = [p for p in repo.iterdir() if p.suffix == ".git"]
    refs = git(cache_repo, "for-each-ref", "--format=%(refname)", "refs/kvmctl/").split()
    assert len(refs) == KEEP_TREES + 1  # this source's five and the other one's


def test_concurrent_checkouts_from_four_threads(upstream: Upstream, tmp_path: Path) -> None:
    shas = [upstream.first, upstream.second, upstream.dev, upstream.second]
    results: dict[int, Checkout] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(i: int) -> None:
        # two GitCache objects on one directory, as two processes would have
        cache = GitCache(str(tmp_path / "cache"), timeout=30)
        start.wait()
        try:
            for _ in range(3):
                results[i] = cache.checkout(SourceSpec.of(upstream.url, "main", "manifests"),
                                            shas[i])
        except BaseException as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [results[i].commit.sha for i in range(4)] == shas
    assert results[1].root == results[3].root
    assert sorted(files(results[2])) == ["a.yaml", "b.yaml", "dev.yaml", "run.sh"]
    assert sorted(files(results[0])) == ["a.yaml"]
    assert not [n for n in os.listdir(tmp_path / "cache" / "trees") if n.startswith(".")]


def test_concurrent_checkouts_from_two_processes(upstream: Upstream, tmp_path: Path) -> None:
    code = ("import sys; from kvmctl.source import GitCache, SourceSpec\n"
            "c = GitCache(sys.argv[1])\n"
            "for _ in range(3): print(c.checkout(SourceSpec.of(sys.argv[2], 'main', "
            "'manifests')).commit.sha)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache"),
                               upstream.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.split() == [upstream.second] * 3


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../../etc/passwd", "../README"])
def test_a_symlink_out_of_the_tree_is_refused(upstream: Upstream, cache: GitCache,
                                              target: str) -> None:
    os.symlink(target, upstream.work / "manifests" / "x.yaml")
    sha = commit(upstream.work, {}, "link out", T0 + 30)
    with pytest.raises(SourceError, match="x.yaml is a symlink"):
        cache.checkout(SourceSpec.of(upstream.url, "main", "manifests"), sha)
    for top, dirs, names in os.walk(cache.cache_dir):
        for name in dirs + names:
            path = os.path.join(top, name)
            assert not os.path.islink(path), path
    assert trees(cache) == []


def test_a_symlink_inside_the_tree_is_kept(upstream: Upstream, cache: GitCache) -> None:
    os.symlink("a.yaml", upstream.work / "manifests" / "alias.yaml")
    sha = commit(upstream.work, {}, "link in", T0 + 31)
    out = cache.checkout(SourceSpec.of(upstream.url, "main", "manifests"), sha)
    link = os.path.join(out.manifests, "alias.yaml")
    assert os.readlink(link) == "a.yaml"
    assert Path(link).read_text(encoding="utf-8") == "a: 1\n"


def test_git_environment_of_a_hook_does_not_leak_in(upstream: Upstream, cache: GitCache,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    """kvmctl sync run from a git hook: GIT_DIR and friends name another repository."""
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "index"))
    out = cache.checkout(SourceSpec.of(upstream.url, "main", "manifests"))
    assert out.commit.sha == upstream.second


def test_protocol_v0_server_serves_tips_and_refuses_other_commits(upstream: Upstream,
                                                                  cache: GitCache) -> None:
    """Fetching by id falls back to the tips of branches and tags when the server refuses."""
    Path(os.environ["HOME"], ".gitconfig").write_text("[protocol]\n\tversion = 0\n",
                                                      encoding="utf-8")
    older = upstream.first  # a tag's tip
    middle = commit(upstream.work, {"manifests/m.yaml": "m\n"}, "middle", T0 + 40)
    commit(upstream.work, {"manifests/z.yaml": "z\n"}, "top", T0 + 41)
    spec = SourceSpec.of(upstream.url, "main", "manifests")
    assert cache.checkout(spec).commit.message == "top"
    assert cache.checkout(spec, older).commit.sha == older
    with pytest.raises(SourceError, match=rf"commit {middle} not found .* no branch or tag tip"):
        cache.checkout(spec, middle)


# -- credentials, unreachable servers, timeouts -------------------------------------------

def test_credentials_never_appear_in_errors(cache: GitCache) -> None:
    spec = SourceSpec.of("http://user:secret@127.0.0.1:1/repo.git", "main")
    assert "secret" not in spec.display and "user" not in spec.display
    for call in (lambda: cache.remote_commit(spec), lambda: cache.checkout(spec, "a" * 40)):
        with pytest.raises(SourceError) as caught:
            call()
        message = str(caught.value)
        assert "secret" not in message and "user:" not in message
        assert message.startswith("http://127.0.0.1:1/repo.git@main:.: git ")
    token = SourceSpec.of("https://tok-12345@127.0.0.1:1/repo.git")
    with pytest.raises(SourceError) as caught:
        cache.remote_commit(token)
    assert "tok-12345" not in str(caught.value)


def test_an_unreachable_server_fails_within_the_timeout(tmp_path: Path) -> None:
    cache = GitCache(str(tmp_path / "cache"), timeout=10)
    # git's own refusal, not the cache's timeout ("did not finish within"), ends it
    with pytest.raises(SourceError, match=r"^http://127.0.0.1:1/x.git@HEAD:.: git ls-remote "
                                          r"failed: fatal: unable to access"):
        cache.remote_commit(SourceSpec.of("http://127.0.0.1:1/x.git"))


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    """The connection is accepted (the listen backlog) and nothing is ever said."""
    cache = GitCache(str(tmp_path / "cache"), timeout=1.5)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        with pytest.raises(SourceError, match=r"git ls-remote did not finish within 1.5 s"):
            cache.remote_commit(SourceSpec.of(f"http://u:pw@127.0.0.1:{port}/x.git"))
        with pytest.raises(SourceError, match=r"git fetch did not finish within 1.5 s"):
            cache.checkout(SourceSpec.of(f"git://127.0.0.1:{port}/x.git"), "b" * 40)


def test_a_password_prompt_fails_instead_of_hanging(tmp_path: Path) -> None:
    """git asks for a password as `git credential fill` does: in git's environment for the
    cache, with no terminal, that fails at once."""
    cache = GitCache(str(tmp_path / "cache"), timeout=20)
    env = cache._env()
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["LC_ALL"] == "C"
    assert subprocess.run([env["GIT_ASKPASS"]], check=False).returncode != 0
    done = subprocess.run(["git", "credential", "fill"], input="protocol=https\nhost=h\n\n",
                          capture_output=True, text=True, env=env, timeout=20,
                          start_new_session=True)
    assert done.returncode != 0
    assert "terminal prompts disabled" in done.stderr  # refused, not waited out


def test_an_unwritable_cache_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("", encoding="utf-8")
    with pytest.raises(SourceError, match="git cache"):
        GitCache(str(tmp_path / "file" / "cache"))


# -- git daemon ---------------------------------------------------------------------------

@pytest.fixture
def daemon(upstream: Upstream, tmp_path: Path) -> Iterator[str]:
    """`git daemon` serving tmp_path/served on a free port of 127.0.0.1; its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(upstream.work), str(served / "repo.git"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all",
                                f"--base-path={served}", "--listen=127.0.0.1", f"--port={port}",
                                str(served)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "git daemon did not start listening"
                time.sleep(0.05)
        yield f"git://127.0.0.1:{port}"
    finally:
        process.terminate()  # this daemon only, by the Popen's pid
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def test_checkout_over_git_daemon(daemon: str, upstream: Upstream, cache: GitCache) -> None:
    spec = SourceSpec.of(f"{daemon}/repo.git", "main", "manifests")
    assert cache.remote_commit(spec) == upstream.second
    assert cache.remote_commit(SourceSpec.of(f"{daemon}/repo.git", "v1-annotated")) \
        == upstream.first
    out = cache.checkout(spec)
    assert out.commit.sha == upstream.second
    assert sorted(files(out)) == ["a.yaml", "b.yaml", "run.sh"]
    # a commit that is no tip, by id, over git:// (protocol v2)
    served = Path(cache.cache_dir).parent / "served" / "repo.git"
    work = Path(cache.cache_dir).parent / "pusher"
    git(work.parent, "clone", "-q", str(served), str(work))
    older = commit(work, {"manifests/o.yaml": "o\n"}, "o", T0 + 50)
    commit(work, {"manifests/p.yaml": "p\n"}, "p", T0 + 51)
    git(work, "push", "-q", "origin", "main")
    assert cache.checkout(spec, older).commit.message == "o"
    with pytest.raises(SourceError, match="not found"):
        cache.remote_commit(SourceSpec.of(f"{daemon}/repo.git", "nope"))
    with pytest.raises(SourceError, match="git ls-remote failed"):
        cache.remote_commit(SourceSpec.of(f"{daemon}/missing.git"))
