"""Host allow-list, exact media type and same-origin checks shared by `serve` and `annotate`."""

from toolkit.netutil import allowed_hosts, host_allowed, host_name, is_json_media_type, same_origin


def test_host_name_strips_port_brackets_and_case():
    assert host_name("LocalHost:8000") == "localhost"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("example.com.") == "example.com"
    assert host_name("") == ""


def test_attacker_host_is_refused_loopback_and_ip_literals_pass():
    allowed = allowed_hosts("127.0.0.1")
    assert not host_allowed("attacker.example", allowed)
    assert not host_allowed("attacker.example:8000", allowed)
    assert not host_allowed(None, allowed)
    for ok in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "app.localhost", "10.0.0.5:80"):
        assert host_allowed(ok, allowed), ok


def test_allowed_hosts_adds_bind_name_and_extras():
    allowed = allowed_hosts("myhost.lan", ["rm.example.org"])
    assert host_allowed("myhost.lan:8000", allowed)
    assert host_allowed("RM.example.org", allowed)
    assert not host_allowed("other.example.org", allowed)
    assert host_allowed("anything.example", allowed_hosts("0.0.0.0", ["*"]))


def test_json_media_type_is_parsed_exactly():
    assert is_json_media_type("application/json")
    assert is_json_media_type("Application/JSON; charset=utf-8")
    assert not is_json_media_type("text/plain; charset=application/json")
    assert not is_json_media_type("application/jsonx")
    assert not is_json_media_type(None)


def test_same_origin_compares_host_and_port():
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert same_origin("http://127.0.0.1:8080/rank?x=1", "127.0.0.1:8080")
    assert not same_origin("http://127.0.0.1:9999", "127.0.0.1:8080")
    assert not same_origin("null", "127.0.0.1:8080")
    assert not same_origin(None, "127.0.0.1:8080")
