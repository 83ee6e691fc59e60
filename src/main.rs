fn main() {
    std::process::exit(sepo::cli::main());
}
