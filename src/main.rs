//! The `crmcube` binary: parse arguments, run the command, map errors to exit codes.

fn main() {
    std::process::exit(crmcube::cli::main());
}
