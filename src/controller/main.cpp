// pxcontroller: a drop-in replacement for ipcontroller.
#include "controller/controller.hpp"
#include "util/log.hpp"
#include "util/memory.hpp"

#include <algorithm>
#include <csignal>
#include <iostream>

namespace {
pxf::controller::Controller* g_controller = nullptr;
extern "C" void on_signal(int) {
  if (g_controller) g_controller->request_stop();
}
}  // namespace

int main(int argc, char** argv) {
  pxf::memory::keep_freed_memory();  // before ZeroMQ starts its threads
  pxf::log::set_name("pxcontroller");
  std::vector<std::string> args(argv + 1, argv + argc);
  if (std::find(args.begin(), args.end(), "--version") != args.end()) {
    std::cout << "pxcontroller " << PXF_VERSION << "\n";  // CMake's project version
    return 0;
  }
  std::optional<pxf::controller::Options> opts;
  try {
    opts = pxf::controller::parse_options(args);
  } catch (const pxf::controller::UsageError& e) {
    std::cerr << "pxcontroller: " << e.what() << "\n";
    return 2;
  }
  if (!opts) return 0;
  pxf::log::set_level(opts->log_level);
  try {
    pxf::controller::Controller controller(std::move(*opts));
    g_controller = &controller;
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
    controller.start();
    int rc = controller.run();
    g_controller = nullptr;
    return rc;
  } catch (const std::exception& e) {
    PXF_LOG(critical, "pxcontroller") << e.what();
    return 1;
  }
}
