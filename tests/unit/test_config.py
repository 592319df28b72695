"""Configuration validation: every bad input raises ConfigurationError saying what to fix."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from sqlalchemy_partpool import (
    ConfigurationError,
    Partition,
    PartpoolError,
    PoolSettings,
    ShardedConfig,
)
from sqlalchemy_partpool.config import mask_url

URL0 = "postgresql+psycopg2://app:s3cret-pw@127.0.0.1:5432/db0"
URL1 = "postgresql+psycopg2://app:s3cret-pw@127.0.0.1:5432/db1"


def build(**kw):
    partitions = kw.pop("partitions", {"p0": URL0, "p1": URL1})
    return ShardedConfig.build(partitions, **kw)


def test_defaults_are_the_seed_numbers():
    settings = PoolSettings()
    assert (settings.min_connections, settings.max_connections) == (1, 10)
    config = build()
    assert config.names == ("p0", "p1")
    assert config.partitions[0].settings(config.pool) == settings


def test_partition_overrides_inherit_the_rest():
    config = build(
        partitions={"p0": URL0, "p1": {"url": URL1, "max_connections": 20}},
        min_connections=2,
        timeout=5,
    )
    p0, p1 = (p.settings(config.pool) for p in config.partitions)
    assert (p0.min_connections, p0.max_connections, p0.timeout) == (2, 10, 5)
    assert (p1.min_connections, p1.max_connections, p1.timeout) == (2, 20, 5)


@pytest.mark.parametrize(
    ("kwargs", "fragment", "option"),
    [
        (
            {"min_connections": 5, "max_connections": 2},
            "greater than max_connections",
            "min_connections",
        ),
        ({"min_connections": -1}, "must not be negative", "min_connections"),
        ({"max_connections": 0}, "at least 1", "max_connections"),
        ({"max_connections": 2.5}, "whole number", "max_connections"),
        ({"max_connections": True}, "whole number", "max_connections"),
        ({"timeout": 0}, "greater than 0", "timeout"),
        ({"timeout": -3}, "non-negative", "timeout"),
        ({"timeout": float("nan")}, "finite", "timeout"),
        ({"max_idle": 0}, "greater than 0", "max_idle"),
        ({"max_lifetime": "soon"}, "number of seconds", "max_lifetime"),
        ({"lifetime_jitter": 1.5}, "fraction below 1", "lifetime_jitter"),
        ({"pre_ping": "yes"}, "true or false", "pre_ping"),
        ({"max_waiting": -1}, "must not be negative", "max_waiting"),
        ({"max_conections": 3}, "did you mean 'max_connections'", "max_conections"),
    ],
)
def test_bad_pool_settings_raise_configuration_error(kwargs, fragment, option):
    with pytest.raises(ConfigurationError) as info:
        build(**kwargs)
    assert fragment in str(info.value)
    assert info.value.option == option


def test_bad_setting_on_one_partition_names_that_partition():
    with pytest.raises(ConfigurationError) as info:
        build(partitions={"p0": URL0, "orders-7": {"url": URL1, "min_connections": 50}})
    assert info.value.partition == "orders-7"
    assert "partition 'orders-7'" in str(info.value)
    assert "greater than max_connections" in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["", "has space", "semi;colon", "x" * 64, "-leading-dash", "slash/inside", "quote'", 7, None],
)
def test_unsafe_partition_names_are_rejected(name):
    with pytest.raises(ConfigurationError, match="partition name"):
        build(partitions={name: URL0})


def test_duplicate_names_are_rejected():
    with pytest.raises(ConfigurationError, match="duplicate partition name"):
        build(partitions=[Partition.create("p0", URL0), Partition.create("p0", URL1)])


def test_a_finished_config_is_taken_as_is_but_not_with_more_settings():
    config = ShardedConfig.build({"p0": URL0}, max_connections=3)
    assert ShardedConfig.build(config) is config
    with pytest.raises(ConfigurationError, match="not both"):
        ShardedConfig.build(config, max_connections=4)
    with pytest.raises(ConfigurationError, match="not both"):
        ShardedConfig.build(config, lazy=True)


def test_no_partitions_is_an_error():
    with pytest.raises(ConfigurationError, match="no partitions"):
        build(partitions={})


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("not a url", "not a valid SQLAlchemy URL"),
        ("mysql://u:pw@h/db", "not a PostgreSQL URL"),
        ("sqlite:///x.db", "not a PostgreSQL URL"),
        (42, "expected a URL string"),
        ("host=h port=notanumber dbname=d", "port"),
    ],
)
def test_bad_urls_are_rejected(url, fragment):
    with pytest.raises(ConfigurationError) as info:
        build(partitions={"p0": url})
    assert fragment in str(info.value)
    assert info.value.partition == "p0"


def test_libpq_dsn_is_accepted_and_converted():
    config = build(partitions={"p0": "host=10.0.0.1 port=6432 dbname=orders user=app password=pw"})
    url = config.partitions[0].url
    assert (url.host, url.port, url.database, url.username) == ("10.0.0.1", 6432, "orders", "app")
    assert url.drivername == "postgresql+psycopg2"


@pytest.mark.parametrize("option", ["pool_size", "max_overflow", "poolclass", "pool_recycle"])
def test_engine_options_owned_by_the_pool_are_rejected(option):
    with pytest.raises(ConfigurationError, match="managed by the partition pool"):
        build(engine_options={option: 5})


def test_unknown_top_level_key_in_dict():
    with pytest.raises(ConfigurationError, match="unknown key 'partitons'"):
        ShardedConfig.from_dict({"partitions": {"p0": URL0}, "partitons": {}})


def test_configuration_error_is_a_partpool_and_sqlalchemy_argument_error():
    assert issubclass(ConfigurationError, PartpoolError)
    assert issubclass(ConfigurationError, sa_exc.ArgumentError)


def test_passwords_are_masked_in_reprs_and_errors():
    config = build()
    for text in (repr(config), repr(config.partitions[0]), config.partitions[0].safe_url):
        assert "s3cret-pw" not in text
        assert "***" in text
    with pytest.raises(ConfigurationError) as info:
        build(partitions={"p0": "mysql://app:s3cret-pw@h/db"})
    assert "s3cret-pw" not in str(info.value)
    assert mask_url("::::s3cret-pw") == "<unparseable URL>"


def test_toml_file(tmp_path, monkeypatch):
    monkeypatch.setenv("P1_PASSWORD", "from-env")
    path = tmp_path / "partpool.toml"
    path.write_text(
        """
lazy = true

[pool]
min_connections = 2
max_connections = 8
max_idle = 30

[router]
strategy = "hash"
buckets = 64

[engine_options]
echo = false

[partitions.p0]
url = "postgresql+psycopg2://app@127.0.0.1/db0"

[partitions.p1]
url = "postgresql+psycopg2://app@127.0.0.1/db1"
password_env = "P1_PASSWORD"
max_connections = 16
"""
    )
    config = ShardedConfig.from_toml(path)
    assert config.lazy is True
    assert config.router == {"strategy": "hash", "buckets": 64}
    assert config.pool.max_idle == 30
    p0, p1 = config.partitions
    assert p1.url.password == "from-env"
    assert "from-env" not in repr(config)
    assert p1.settings(config.pool).max_connections == 16
    assert p0.settings(config.pool).max_connections == 8


def test_toml_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigurationError, match="does not exist"):
        ShardedConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[partitions\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        ShardedConfig.from_toml(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[partitions.p0]\nurl = "postgresql://h/db"\nmax_conn = 3\n')
    with pytest.raises(ConfigurationError, match="unknown partition option 'max_conn'") as info:
        ShardedConfig.from_toml(unknown)
    assert info.value.partition == "p0"
    monkeypatch.delenv("NOPE_PW", raising=False)
    secret = tmp_path / "secret.toml"
    secret.write_text('[partitions.p0]\nurl = "postgresql://h/db"\npassword_env = "NOPE_PW"\n')
    with pytest.raises(ConfigurationError, match="NOPE_PW"):
        ShardedConfig.from_toml(secret)


def test_from_env_inline_partitions():
    env = {
        "PARTPOOL_PARTITIONS": f"a={URL0}; b={URL1}",
        "PARTPOOL_MAX_CONNECTIONS": "7",
        "PARTPOOL_PRE_PING": "off",
        "PARTPOOL_MAX_IDLE": "none",
        "PARTPOOL_ROUTER": "pg_hash",
    }
    config = ShardedConfig.from_env(env)
    assert config.names == ("a", "b")
    assert config.pool.max_connections == 7
    assert config.pool.pre_ping is False
    assert config.pool.max_idle is None
    assert config.router == "pg_hash"
    assert make_url(URL1) == config.partitions[1].url


def test_from_env_toml_with_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[pool]\nmax_connections = 4\n[partitions.p0]\nurl = "postgresql://h/db"\n')
    config = ShardedConfig.from_env({"PARTPOOL_CONFIG": str(path), "PARTPOOL_MIN_CONNECTIONS": "3"})
    assert (config.pool.min_connections, config.pool.max_connections) == (3, 4)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "PARTPOOL_PARTITIONS"),
        ({"PARTPOOL_PARTITIONS": "justaname"}, "not of the form name=url"),
        ({"PARTPOOL_PARTITIONS": f"a={URL0} a={URL1}"}, "duplicate"),
        (
            {"PARTPOOL_PARTITIONS": f"a={URL0}", "PARTPOOL_MAX_CONNECTIONS": "ten"},
            "not a valid value",
        ),
        ({"PARTPOOL_PARTITIONS": f"a={URL0}", "PARTPOOL_PRE_PING": "maybe"}, "not a valid value"),
    ],
)
def test_from_env_errors(env, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        ShardedConfig.from_env(env)


def test_settings_replace_validates():
    with pytest.raises(ConfigurationError):
        PoolSettings().replace(max_connections=0)
