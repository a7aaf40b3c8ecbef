"""`agentvault-dev run`: the whole mesh on this machine, with embedded PostgreSQL and Redis unless
DATABASE_URL / REDIS_URL point elsewhere. Ctrl-C stops everything; data stays in AGENTVAULT_DATA_DIR."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from agentvault.common.settings import Env, SettingsError
from agentvault.devserver.embedded import EmbeddedPostgres, EmbeddedRedis, ensure_admin_token, ensure_encryption_key
from agentvault.devserver.mesh import SERVICES, Mesh


def run() -> int:
    env = Env()
    try:
        data_dir = Path(env.str("AGENTVAULT_DATA_DIR", "./.data")).resolve()
        ports = {spec.port_var: str(env.port(spec.port_var)) for spec in SERVICES}
    except SettingsError as exc:
        print(f"agentvault-dev: {exc}", file=sys.stderr)
        return 2
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    postgres = redis = None
    mesh: Mesh | None = None
    try:
        database_url = env.optional("DATABASE_URL")
        if database_url is None:
            postgres = EmbeddedPostgres(data_dir / "postgres")
            database_url = postgres.start()
        redis_url = env.optional("REDIS_URL")
        if redis_url is None:
            redis = EmbeddedRedis(data_dir / "redis")
            redis_url = redis.start()
        admin_token = env.optional("AGENTVAULT_ADMIN_TOKEN")
        generated = False
        if admin_token is None:
            admin_token, generated = ensure_admin_token(data_dir)
        service_env = {
            **ports,
            "AGENTVAULT_DATA_DIR": str(data_dir),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "AGENTVAULT_ADMIN_TOKEN": admin_token,
            "FEDERATION_ENCRYPTION_KEYS": env.optional("FEDERATION_ENCRYPTION_KEYS") or ensure_encryption_key(data_dir),
            "LOG_FORMAT": os.environ.get("LOG_FORMAT", "text"),
        }
        mesh = Mesh(service_env, log_dir=None)
        mesh.start()
        print("\nAgentVault Mesh is running:", flush=True)
        print(f"  edge (HTTP/JSON)   http://127.0.0.1:{mesh.port('edge')}/api/v1/health")
        print(f"  OpenAPI            http://127.0.0.1:{mesh.port('edge')}/api/v1/openapi.json")
        for spec in SERVICES:
            if spec.kind == "grpc":
                print(f"  {spec.name:<18} grpc://{mesh.address(spec.name)}")
        print(f"  PostgreSQL         {'embedded, ' + str(data_dir / 'postgres') if postgres else 'DATABASE_URL'}")
        print(f"  Redis              {redis_url if redis else 'REDIS_URL'}")
        where = f"(generated, kept in {data_dir / 'admin_token'})" if generated else "(from the data folder or env)"
        print(f"  admin token        {admin_token} {where}")
        print("Press Ctrl-C to stop.\n", flush=True)
        while not stopping:
            for name, process in list(mesh.processes.items()):
                if process.poll() is not None:
                    print(f"agentvault-dev: {name} exited with code {process.returncode}; stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
        return 0
    except Exception as exc:
        print(f"agentvault-dev: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nStopping...", flush=True)
        if mesh is not None:
            mesh.stop()
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()
        print("Stopped; data kept in", data_dir, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="agentvault-dev", description=__doc__)
    parser.add_argument("command", choices=["run"], help="run: start the whole mesh in the foreground")
    parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.exit(run())


if __name__ == "__main__":
    main()
