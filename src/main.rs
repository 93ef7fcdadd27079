//! The `graft` binary: runs the CLI and turns an error into one line on stderr and a non-zero exit code.

fn main() {
    graft::alloc::tune_allocator();
    let code = match graft::cli::run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("graft: error: {}", graft::error::bounded(&e.to_string()));
            e.exit_code()
        }
    };
    std::process::exit(code);
}
