//! The `graft` binary: runs the CLI and turns an error into one line on stderr and a non-zero exit code; SIGINT and
//! SIGTERM remove the outputs' temporaries and exit 130/143.

fn main() {
    graft::checkpoint::commit::install_signal_cleanup();
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
