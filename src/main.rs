//! The `crmcube` binary: parse arguments, run the command, map errors to exit codes.
//!
//! Memory comes from mimalloc (as in DataFusion's own CLI): it returns the pages of freed
//! tables to the system, where glibc's allocator kept a 10 M-line load at its high-water mark.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(crmcube::cli::main());
}
