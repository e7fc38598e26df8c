"""Record writers for the concurrent-writers test, in a module of their own: a spawned process imports its
target's module, and this one imports only the store."""

from scaling_lab.fit.io import store


def write_many(results_dir: str, writer: int) -> None:
    for i in range(150):
        run_id = f"r{i % 30:03d}"  # both writers keep rewriting the same 30 records
        store.write_record(results_dir, {"run_id": run_id, "sweep": "race", "status": "ok", "writer": writer,
                                           "loss": {"final": float(i)}, "padding": "x" * 20000})
