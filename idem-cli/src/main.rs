//! The `idem` command: see `idem --help`.

/// mimalloc: fewer instructions per allocation than glibc's malloc on the
/// gateway's path (a request allocates its head, its body, the record and
/// the response), measured in BENCHMARKS.md. Its 2.x line (the crate's
/// `v2` feature) rather than the crate's default 3.x: a burst of 500 new
/// connections cost the gateway ~21 % less CPU on it (medians of seven
/// bursts each, the 3.x line zeroing pages it had just returned), with the
/// same CPU per steady request and resident memory per record within the
/// noise of each other (338–426 B against 362–422 B).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    idem_cli::main()
}
