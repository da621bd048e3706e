//! The local control socket: `check`, `status`, `rollback`, `skip-window`, one JSON line each
//! way. Only local users with access to the socket file can use it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::agent::{Command, Status};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub command: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

/// Serves the socket until the agent stops.
pub async fn serve(
    path: &Path,
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<Status>>,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let commands = commands.clone();
        let status = Arc::clone(&status);
        tokio::spawn(async move {
            if let Err(error) = answer(stream, commands, status).await {
                tracing::debug!(%error, "control connection");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<Status>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(error) => {
            Response { ok: false, message: format!("malformed request: {error}"), status: None }
        }
        Ok(request) => match request.command.as_str() {
            "status" => {
                let status = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Response {
                    ok: true,
                    message: String::new(),
                    status: serde_json::to_value(status).ok(),
                }
            }
            "check" => sent(commands.send(Command::Check).await.is_ok(), "check-in requested"),
            "skip-window" => sent(
                commands.send(Command::SkipWindow).await.is_ok(),
                "the next reboot will not wait for the window",
            ),
            "rollback" => {
                let (tx, rx) = oneshot::channel();
                if commands.send(Command::Rollback(tx)).await.is_err() {
                    sent(false, "")
                } else {
                    match rx.await {
                        Ok(Ok(message)) => Response { ok: true, message, status: None },
                        Ok(Err(message)) => Response { ok: false, message, status: None },
                        Err(_) => sent(false, ""),
                    }
                }
            }
            other => {
                Response { ok: false, message: format!("unknown command {other:?}"), status: None }
            }
        },
    };
    let mut text = serde_json::to_string(&response).expect("plain data");
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

fn sent(ok: bool, message: &str) -> Response {
    if ok {
        Response { ok, message: message.into(), status: None }
    } else {
        Response { ok, message: "the agent is shutting down".into(), status: None }
    }
}

/// Sends one command to a running agent.
pub async fn request(path: &Path, command: &str) -> std::io::Result<Response> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(&Request { command: command.into() }).expect("plain data");
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
