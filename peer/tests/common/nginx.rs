//! Debian's nginx in a directory of its own, on a free loopback port; stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Nginx {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx with the `server` block `server(port)` (which must listen on
    /// `127.0.0.1:{port}`), logging requests to `access.log`.
    pub fn start(dir: &Path, server: impl Fn(u16) -> String) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        // nginx cannot listen on port 0 and say which port it got: take a free one, and try
        // again if someone else took it first.
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let d = dir.display();
            let config = format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log {d}/access.log;\n\
                   client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
                   fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
                   {}\n}}\n",
                server(port)
            );
            std::fs::write(dir.join("nginx.conf"), config).expect("nginx.conf");
            let mut child = Command::new("/usr/sbin/nginx")
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx (Debian package nginx)");
            // Up when it accepts; gone if the port was taken.
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                    assert!(log.contains("Address already in use"), "nginx exited {status}: {log}");
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { child, port, dir: dir.to_owned() };
                }
                // Polling for the port (the loop's condition): the interval between tries.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("no free port for nginx");
    }

    /// nginx serving the files of `root` as they are.
    pub fn serve_files(dir: &Path, root: &Path) -> Self {
        Self::start(dir, |port| {
            format!("server {{ listen 127.0.0.1:{port}; root {}; }}", root.display())
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
