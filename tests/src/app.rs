//! The application behind nginx: an axum router on a loopback port.

use std::net::SocketAddr;

/// An axum router served on a loopback port in a tokio task, stopped on drop.
#[derive(Debug)]
pub struct App {
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    /// Serve `router` on a free 127.0.0.1 port. Needs a tokio runtime.
    pub async fn serve(router: axum::Router) -> App {
        App::serve_on("127.0.0.1:0", router).await
    }

    /// Serve `router` on `address` (say a [`free_addr`](crate::free_addr) already in the config).
    pub async fn serve_on(address: &str, router: axum::Router) -> App {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .unwrap_or_else(|e| panic!("bind app on {address}: {e}"));
        App::serve_listener(listener, router)
    }

    /// Serve `router` on a listener already bound. Needs a tokio runtime.
    pub(crate) fn serve_listener(listener: tokio::net::TcpListener, router: axum::Router) -> App {
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
