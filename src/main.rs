//! The `lucidgate` binary: parse arguments, run, report errors, set the exit code.

fn main() {
    match lucidgate::cli::main() {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("lucidgate: error: {err:#}");
            std::process::exit(2);
        }
    }
}
