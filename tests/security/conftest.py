"""A test site made with the certs module: a CA, a relay and a client certificate,
and a second, unrelated CA with a client certificate of its own."""

from __future__ import annotations

import pytest
from security_support import Site

from audiosockets.certs import Issued, init_site, issue


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    home = tmp_path_factory.mktemp("site") / "pki"
    ca = init_site(home)
    relay = issue(home, "relay", ips=["127.0.0.1", "::1"], dns=["localhost"])
    client = issue(home, "rec-1")
    other = tmp_path_factory.mktemp("other") / "pki"
    other_ca = init_site(other)
    stranger = issue(other, "intruder")
    return Site(ca.cert, relay, client, other_ca.cert, stranger, home)


@pytest.fixture(scope="session")
def rec_cert(site: Site) -> Issued:
    """A client certificate of the site's CA with CN ``rec-cert`` (``certs issue``)."""
    return issue(site.home, "rec-cert")
