//! `sitecast-peer`: the appliance agent (being built).

fn main() {
    eprintln!("sitecast-peer: the daemon is not built yet");
    std::process::exit(2);
}
