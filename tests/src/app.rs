//! The application behind nginx: an axum router on a loopback port.

use std::net::SocketAddr;

/// An axum router served on a loopback port in a tokio task, stopped on drop;
/// started by [`StackBuilder::app`](crate::StackBuilder::app).
#[derive(Debug)]
pub struct App {
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    /// Serve `router` on a listener already bound (the [`Stack`](crate::Stack)
    /// builder binds it before the config is final). Needs a tokio runtime.
    pub(crate) fn serve(listener: tokio::net::TcpListener, router: axum::Router) -> App {
        let address = listener.local_addr().expect("app address");
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("app server failed: {e}");
            }
        });
        App { address, task }
    }

    /// `127.0.0.1:PORT`, for `config.nginx.app`.
    pub fn address(&self) -> String {
        self.address.to_string()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}
