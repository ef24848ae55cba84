#pragma once
// Error content as ipyparallel's wrap_exception builds it (protocol §4.9).
#include <nlohmann/json.hpp>

#include <stdexcept>
#include <string>

namespace pxf::controller {

// A request the controller refuses as Python would: the client sees `ename: evalue`
// (error_content below). Its parts have their own names for it: BadRequest (hub queries),
// QueryError (db_request), DependencyError (task metadata).
struct PyError : std::runtime_error {
  PyError(std::string ename, const std::string& evalue) : std::runtime_error(evalue), ename(std::move(ename)) {}
  std::string ename;
};

// {"status": "error", "ename", "evalue", "traceback": [...], "engine_info": {}}
// The traceback reads like a Python one so RemoteError renders naturally.
inline nlohmann::json error_content(const std::string& ename, const std::string& evalue,
                                    const std::string& module = "ipyparallel.error") {
  std::string qualified = module.empty() ? ename : module + "." + ename;
  return {{"status", "error"},
          {"ename", ename},
          {"evalue", evalue},
          {"traceback", nlohmann::json::array({"Traceback (most recent call last):\n", "  (raised by pxcontroller)\n",
                                               qualified + ": " + evalue + "\n"})},
          {"engine_info", nlohmann::json::object()}};
}

}  // namespace pxf::controller
