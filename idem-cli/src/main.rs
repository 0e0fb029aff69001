//! The `idem` command: see `idem --help`.

fn main() -> std::process::ExitCode {
    idem_cli::main()
}
