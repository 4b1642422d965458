"""Exports, private files and server paths, attacked as issue #12 (item 7) describes.

Threats covered, one line each:
- an annotator replays, as raw HTTP with their own login, the export URL an admin received: 403
- nobody logged in fetches an export URL: 401; nor does an admin's cookie after logout
- without accounts, a DNS-rebinding page (another Host) fetches the local admin's export: 400
- a made-up token or name, another export's file, or `../` under the export route: 404
- an annotator fetches the export file through gradio's own file route (file=): refused
- another local user reads exports or gradio's cache in a shared /tmp: the server's own
  folder is 0700 (export files 0600, gradio's cache inside it) and goes when it stops
- another local user reads a new directory store: folders 0700, files 0600 (writes,
  compaction, the serve lock); a store a team gave to a group keeps it, never others
- an annotator reads the server's paths (--data, --runs, --pairs, --auth, ...) in
  /config or /gradio_api/info; an admin's page still shows them (filled on load)
"""

import re
import stat
from pathlib import Path

import pytest
from helpers import CHROMIUM, Server, add_users, client, login, raw_get, vote_record, write_pairs

from trainer.store.compaction import compact
from trainer.store.directory_writer import DirectoryStore, ServeLock


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """A server with accounts, every path it is given inside one temp folder; one export
    made by the admin (its links), and the server's private folder (from its log)."""
    tmp = tmp_path_factory.mktemp("sec")
    add_users(tmp / "users.toml", ann="annotator", boss="admin")
    pairs = write_pairs(tmp / "pairs.jsonl", 4)
    guidelines = tmp / "guidelines.md"
    guidelines.write_text("Be fair.\n")
    server = Server(
        tmp,
        *("--pairs", str(pairs), "--data", str(tmp / "store"), "--runs", str(tmp / "runs")),
        *("--auth", str(tmp / "users.toml"), "--guidelines", str(guidelines)),
    )
    with server:
        ann = client(server.url, "ann")
        view = ann.predict(api_name="/next")
        ann.predict(view["pair"]["pair_id"], "left", "", "", api_name="/vote")
        boss = client(server.url, "boss")
        _, links = boss.predict("standard", "separate", "none", "jsonl", False, api_name="/export")
        private = Path(re.search(r"the exports go to (\S+) \(0700", server.output()).group(1))
        yield dict(server=server, tmp=tmp, ann=ann, boss=boss, links=links, private=private)
    assert not private.exists()  # removed when the server stopped


def test_the_admin_downloads_an_export_as_an_attachment(team):
    r = raw_get(team["links"][0]["url"], team["boss"])
    assert r.status_code == 200
    assert r.headers["content-disposition"].startswith("attachment")
    assert "alpha answer" in r.text or "beta answer" in r.text


def test_an_annotator_replaying_the_admins_export_url_gets_403(team):
    for link in team["links"]:
        r = raw_get(link["url"], team["ann"])
        assert r.status_code == 403, r.text
        assert "answer" not in r.text


def test_nobody_logged_in_gets_401(team):
    r = raw_get(team["server"].url + team["links"][0]["url"])
    assert r.status_code == 401 and "answer" not in r.text


def test_an_admins_cookie_after_logout_gets_401(team):
    other = client(team["server"].url, "boss")  # a session of its own, ended alone
    url = team["links"][0]["url"]
    assert raw_get(url, other).status_code == 200
    raw_get("logout?all_session=false", other)
    assert raw_get(url, other).status_code == 401
    assert raw_get(url, team["boss"]).status_code == 200  # the admin's other session lives on


def test_made_up_and_traversing_paths_find_nothing(team):
    boss, url = team["boss"], team["links"][0]["url"]
    prefix, token, name = url.rsplit("/", 2)
    other = team["boss"].predict("standard", "exclude", "none", "parquet", False, api_name="/export")[1]
    for path in (
        f"{prefix}/{token}x/{name}",  # a made-up token
        f"{prefix}/{token}/made-up.jsonl",
        f"{prefix}/{token}/{other[0]['name']}",  # a real export's file, under another token
        f"{prefix}/{token}/..%2F..%2Fusers.toml",
        f"{prefix}/{token}/%2e%2e%2fgradio",
        f"{prefix}/../../users.toml",
        f"{prefix}/{token}/",
    ):
        r = raw_get(path, boss)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert "pbkdf2" not in r.text and "scrypt" not in r.text and "answer" not in r.text


def test_gradios_file_route_does_not_serve_exports(team):
    export = team["private"] / "exports" / team["links"][0]["name"]
    assert export.is_file()
    for who in ("ann", "boss"):
        r = raw_get(f"gradio_api/file={export}", team[who])
        assert r.status_code in (403, 404), (who, r.status_code)


def test_the_servers_files_are_private_and_gradios_cache_is_among_them(team):
    private = team["private"]
    assert mode(private) == 0o700
    assert mode(private / "exports") == 0o700 and mode(private / "gradio") == 0o700
    files = list((private / "exports").iterdir())
    assert files and all(mode(f) == 0o600 for f in files)
    # whatever gradio caches (an upload here) lands in the server's folder, not /tmp/gradio
    import httpx

    r = httpx.post(
        team["server"].url + "gradio_api/upload",
        files={"files": ("note.txt", b"hello")},
        cookies=team["ann"].cookies,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    (cached,) = r.json()
    assert Path(cached).resolve().is_relative_to((private / "gradio").resolve())


def test_an_annotator_sees_no_server_path_in_config_or_api_info(team):
    tmp = str(team["tmp"])
    for path in ("config", "gradio_api/info"):
        r = raw_get(path, team["ann"])
        assert r.status_code == 200
        assert tmp not in r.text, re.findall(re.escape(tmp) + r"[^\"'`]*", r.text)
        assert str(team["private"]) not in r.text


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")
def test_the_admins_page_gets_the_paths_on_load(team, browser):
    page = login(browser, team["server"].url, "boss")
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function(
        "() => (document.querySelector('#train-intro') || {}).innerText?.includes('runs')", timeout=15_000
    )
    assert str(team["tmp"] / "runs") in page.inner_text("#train-intro")
    assert page.input_value("#policy-prompts textarea, #policy-prompts input")
    # the page's own cookie is what the download route sees: an annotator's is refused
    assert page.request.get(team["server"].url + team["links"][0]["url"]).status == 200
    page.context.close()
    ann = login(browser, team["server"].url, "ann")
    assert ann.request.get(team["server"].url + team["links"][0]["url"]).status == 403
    ann.context.close()


def test_without_accounts_the_local_user_downloads_and_a_rebinding_host_gets_400(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    with Server(tmp_path, "--pairs", str(pairs), "--data", str(tmp_path / "store")) as server:
        solo = client(server.url)
        view = solo.predict(api_name="/next")
        solo.predict(view["pair"]["pair_id"], "left", "", "", api_name="/vote")
        _, links = solo.predict("standard", "exclude", "none", "jsonl", False, api_name="/export")
        url = server.url + links[0]["url"]
        assert raw_get(url).status_code == 200
        assert raw_get(url, headers={"Host": "evil.example.com"}).status_code == 400


# ---- the directory store's files ---------------------------------------------------------


def test_a_new_store_is_0700_with_files_0600(tmp_path):
    root = tmp_path / "deep" / "store"
    with DirectoryStore(root) as store:
        store.append(vote_record("q1?"))
        store.flush()
        store.append(vote_record("q2?"))  # a live segment next to a part
        lock = ServeLock(root, "test")
        try:
            made = [p for p in [root, *root.rglob("*")]]
            assert any(p.suffix == ".jsonl" for p in made) and any(p.suffix == ".parquet" for p in made)
            for p in made:
                assert mode(p) == (0o700 if p.is_dir() else 0o600), p
        finally:
            lock.release()
    with DirectoryStore(root) as store:
        store.append(vote_record("q3?"))
    assert compact(root)["parts_after"] == 1
    for p in [root, *root.rglob("*")]:
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p


def test_a_store_given_to_a_group_keeps_new_files_group_readable(tmp_path):
    import os

    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o2770)  # the team's own choice: group rwx, setgid
    old = os.umask(0o007)
    try:
        with DirectoryStore(root) as store:
            store.append(vote_record("q1?"))
            store.flush()
    finally:
        os.umask(old)
    assert mode(root) == 0o2770  # an existing folder is never chmod'ed
    for p in root.rglob("*"):
        assert mode(p) & 0o777 == (0o770 if p.is_dir() else 0o660), p
