//! docker-compose.yml, nginx/demo.toml and nginx/demo.conf agree: no Docker
//! engine runs here, so this reads the compose file and checks that services,
//! ports, commands and the mounted nginx config match what `mcpage nginx`
//! renders for the demo's config.

use std::path::{Path, PathBuf};

use mcpage::Config;
use mcpage::ServerSpec;
use serde_norway::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn compose() -> Value {
    serde_norway::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is YAML")
}

/// nginx/demo.toml exactly as `mcpage --config nginx/demo.toml` reads it
/// (defaults < file; this test ignores the environment).
fn demo_config() -> Config {
    let config: Config = toml::from_str(&read("nginx/demo.toml")).expect("nginx/demo.toml");
    config.validate().expect("nginx/demo.toml is valid");
    config
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose
        .get("services")
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
}

fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("expected a string, got {other:?}"),
            })
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        None => Vec::new(),
        Some(other) => panic!("expected a list, got {other:?}"),
    }
}

/// `host:port` → (host, port).
fn split(address: &str) -> (&str, u16) {
    let (host, port) = address
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("`{address}` is not host:port"));
    (host, port.parse().expect("port"))
}

/// The value after `flag` in a command line.
fn flag<'a>(command: &'a [String], flag: &str) -> Option<&'a str> {
    command
        .iter()
        .position(|arg| arg == flag)
        .and_then(|i| command.get(i + 1))
        .map(String::as_str)
}

/// A memcached service's port (`-p`, default 11211).
fn memcached_port(command: &[String]) -> u16 {
    flag(command, "-p").map_or(11211, |p| p.parse().expect("-p port"))
}

/// `./host/path:/container/path[:ro]` volumes of a service.
fn mounts(service: &Value) -> Vec<(String, String)> {
    strings(service.get("volumes"))
        .iter()
        .filter_map(|volume| {
            let mut parts = volume.split(':');
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// The compose service with the fixed address `ip` on its network.
fn service_at<'a>(compose: &'a Value, ip: &str) -> (&'a str, &'a Value) {
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services");
    services
        .iter()
        .find(|(_, service)| {
            service
                .get("networks")
                .and_then(Value::as_mapping)
                .is_some_and(|networks| {
                    networks.values().any(|network| {
                        network.get("ipv4_address").and_then(Value::as_str) == Some(ip)
                    })
                })
        })
        .map(|(name, service)| (name.as_str().expect("service name"), service))
        .unwrap_or_else(|| panic!("docker-compose.yml has no service at {ip}"))
}

fn check_memcached(compose: &Value, servers: &[ServerSpec], no_evictions: bool) {
    assert!(!servers.is_empty());
    for server in servers {
        let (ip, port) = split(&server.address);
        let (host, service) = service_at(compose, ip);
        let command = strings(service.get("command"));
        assert!(
            command.first().is_some_and(|c| c == "memcached"),
            "service {host} runs memcached: {command:?}"
        );
        assert_eq!(
            memcached_port(&command),
            port,
            "service {host} listens where the config says"
        );
        assert_eq!(
            command.iter().any(|arg| arg == "-M"),
            no_evictions,
            "service {host}: -M (no evictions) on the index pool, and only there"
        );
    }
}

#[test]
fn the_mounted_nginx_config_is_what_mcpage_renders() {
    let config = demo_config();
    let rendered = mcpage::nginx::render_nginx_config(&config);
    let checked_in = read("nginx/demo.conf");
    assert!(
        rendered == checked_in,
        "nginx/demo.conf is not what `mcpage --config nginx/demo.toml nginx` prints: \
         run scripts/render-nginx\n--- rendered now:\n{rendered}"
    );

    let compose = compose();
    let nginx = service(&compose, "nginx");
    let mounted: Vec<_> = mounts(nginx)
        .into_iter()
        .filter(|(host, _)| host.trim_start_matches("./") == "nginx/demo.conf")
        .collect();
    assert_eq!(mounted.len(), 1, "nginx mounts ./nginx/demo.conf");
    let target = &mounted[0].1;
    assert!(
        target.starts_with("/etc/nginx/conf.d/") && target.ends_with(".conf"),
        "the include goes where the image's nginx.conf includes it: {target}"
    );
    assert!(
        nginx
            .get("image")
            .and_then(Value::as_str)
            .is_some_and(|i| i.starts_with("nginx")),
        "nginx runs the nginx image"
    );
}

#[test]
fn services_and_ports_agree_with_the_config() {
    let config = demo_config();
    let compose = compose();

    // Page and index memcached: the config's servers are compose services.
    check_memcached(&compose, &config.memcached.servers, false);
    assert!(
        !config.memcached.index_servers.is_empty(),
        "the demo keeps the tag index on its own memcached"
    );
    check_memcached(&compose, &config.memcached.index_servers, true);
    // ...and every memcached service is one of them (none is left unused).
    let configured: Vec<&str> = config
        .memcached
        .servers
        .iter()
        .chain(&config.memcached.index_servers)
        .map(|server| service_at(&compose, split(&server.address).0).0)
        .collect();
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services");
    for (name, service) in services {
        let name = name.as_str().expect("service name");
        if strings(service.get("command"))
            .first()
            .is_some_and(|c| c == "memcached")
        {
            assert!(
                configured.contains(&name),
                "memcached service {name} is in neither memcached.servers nor index_servers"
            );
        }
    }

    // nginx publishes the port it listens on.
    let (listen_host, listen_port) = split(&config.nginx.listen);
    assert_eq!(
        listen_host, "0.0.0.0",
        "nginx listens on every interface in its container"
    );
    let ports = strings(service(&compose, "nginx").get("ports"));
    assert!(
        ports.iter().any(|p| p
            .rsplit(':')
            .next()
            .is_some_and(|container| container == listen_port.to_string())),
        "nginx publishes container port {listen_port}: {ports:?}"
    );

    // The demo is nginx's app: the service name and port of nginx.app.
    let (app_host, app_port) = split(&config.nginx.app);
    let demo = service(&compose, app_host);
    let command = strings(demo.get("command"));
    let listen = flag(&command, "--listen").expect("the demo service passes --listen");
    assert_eq!(
        split(listen),
        ("0.0.0.0", app_port),
        "demo listens on nginx.app's port"
    );
    let expose = strings(demo.get("expose"));
    assert!(
        expose.contains(&app_port.to_string()),
        "demo exposes {app_port}: {expose:?}"
    );

    // The demo reads nginx/demo.toml as its config, so both sides agree on keys.
    let config_path = flag(&command, "--config").expect("the demo service passes --config");
    assert!(
        mounts(demo)
            .iter()
            .any(
                |(host, target)| host.trim_start_matches("./") == "nginx/demo.toml"
                    && target == config_path
            ),
        "the demo mounts nginx/demo.toml at {config_path}"
    );

    // Built by a multi-stage Dockerfile that builds the demo.
    let build = demo.get("build").expect("the demo service is built");
    let dockerfile = build
        .get("dockerfile")
        .and_then(Value::as_str)
        .expect("build.dockerfile");
    assert_eq!(build.get("context").and_then(Value::as_str), Some("."));
    let text = read(dockerfile);
    assert!(
        text.matches("\nFROM ").count() >= 2,
        "{dockerfile} is multi-stage"
    );
    assert!(
        text.contains("-p mcpage-demo"),
        "{dockerfile} builds mcpage-demo"
    );
    assert!(text.contains("ENTRYPOINT [\"mcpage-demo\"]"));

    // The original setup's exclusions.
    for rule in mcpage_demo::EXCLUDE {
        assert!(
            config.cache.exclude.iter().any(|r| r == rule),
            "nginx/demo.toml excludes {rule}"
        );
    }
}
