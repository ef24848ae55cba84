#pragma once
// JSON values seen the way the stock (Python) controller sees them: for error messages that
// name Python types, and for the truth tests DictDB queries and dependencies make.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

namespace pxf::controller {

// Python's name for the type of a JSON value ("NoneType", "int", "str", "list", ...).
inline const char* py_type(const nlohmann::json& j) {
  using t = nlohmann::json::value_t;
  switch (j.type()) {
  case t::null: return "NoneType";
  case t::boolean: return "bool";
  case t::number_integer:
  case t::number_unsigned: return "int";
  case t::number_float: return "float";
  case t::string: return "str";
  case t::array: return "list";
  case t::object: return "dict";
  default: return "object";
  }
}

// Python's bool(value).
inline bool truthy(const nlohmann::json& j) {
  using t = nlohmann::json::value_t;
  switch (j.type()) {
  case t::null: return false;
  case t::boolean: return j.get<bool>();
  case t::number_integer: return j.get<std::int64_t>() != 0;
  case t::number_unsigned: return j.get<std::uint64_t>() != 0;
  case t::number_float: return j.get<double>() != 0.0;
  case t::string: return !j.get_ref<const std::string&>().empty();
  case t::array:
  case t::object: return !j.empty();
  default: return true;
  }
}

}  // namespace pxf::controller
