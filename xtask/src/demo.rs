//! `cargo xtask demo`: dockwall on a throwaway Docker host, narrated with
//! the commands an admin would type. Cleans up everything it made.

use crate::lab::{Client, Dockerd, Dockwall};

pub fn run() -> anyhow::Result<()> {
    say("starting a private dockerd and building a tiny busybox image");
    let dockerd = Dockerd::start()?;
    dockerd.build_image()?;
    let dw = Dockwall::new(dockerd.host())?;
    let office = Client::new("dw-demo-office", "dwo0", 11)?;
    let internet = Client::new("dw-demo-inet", "dwi0", 12)?;
    say(
        "docker run -d --name web -p 8081:8080 ... busybox httpd   (published 8081 -> container 8080)",
    );
    dockerd.run_web("web", &["-p", "8081:8080"])?;
    let office_url = format!("{}:8081", office.host4);
    let inet_url = format!("{}:8081", internet.host4);
    say(&format!(
        "two outside hosts: office {} (on dwo0), internet {} (on dwi0)",
        office.addr4, internet.addr4
    ));
    show(
        "without dockwall",
        &office,
        &office_url,
        &internet,
        &inet_url,
    );

    typed(&format!("sudo dockwall allow {} --port 8081", office.addr4));
    print!("{}", dw.run(&["allow", &office.addr4, "--port", "8081"])?.1);
    typed("sudo dockwall load --iface dwo0 --iface dwi0   (runs in the background here)");
    let loaded = dw.load(&["dwo0", "dwi0"])?;
    for line in loaded.output() {
        println!("    {line}");
    }
    show("with dockwall", &office, &office_url, &internet, &inet_url);
    typed("dockwall status");
    print!("{}", dw.run(&["status"])?.1);
    typed("dockwall list");
    print!("{}", dw.run(&["list"])?.1);
    typed("sudo dockwall unload");
    drop(loaded);
    say("demo done; cleaning up the containers, dockerd and namespaces");
    Ok(())
}

fn show(when: &str, office: &Client, office_url: &str, internet: &Client, inet_url: &str) {
    for (who, client, url) in [
        ("office", office, office_url),
        ("internet", internet, inet_url),
    ] {
        let verdict = match client.http_get(url) {
            Ok(body) => format!("connected, got {body:?}"),
            Err(_) => "BLOCKED (no answer)".to_string(),
        };
        println!("  {when}: {who} -> {url}: {verdict}");
    }
}

fn say(msg: &str) {
    println!("\n== {msg}");
}

fn typed(cmd: &str) {
    println!("\n$ {cmd}");
}
