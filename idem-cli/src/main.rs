//! The `idem` command: see `idem --help`.

/// mimalloc: fewer instructions per allocation than glibc's malloc on the
/// gateway's path (a request allocates its head, its body, the record and
/// the response), measured in BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    idem_cli::main()
}
